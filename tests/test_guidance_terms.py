"""Guidance terms compose: Attentive Eraser's redirection guidance next to perturbed-attention guidance.

Three row roles in one batch (the output, the eraser's plain copy, PAG's perturbed copy). The
step's prediction must be the pipeline's own (the conditional row, no CFG here) plus each active
term in instance-name order: ``w + (s_e - 1)(w - wo) + s_p (w - ptb)``, computed here from the
rows the UNet returned, bit for bit; and each strategy alone gives another image.
"""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.runner import Runner

STEPS = 3


def _run(pipe, image_and_mask, config):
    raw, given = [], []
    before = pipe.unet.register_forward_hook(lambda m, a, out: raw.append(out[0].detach().clone()))
    try:
        with Runner(pipe, config) as runner:
            after = pipe.unet.register_forward_hook(lambda m, a, out: given.append(out[0].detach().clone()))
            try:
                result = runner(prepare_inputs(*image_and_mask, warn=False), "", seed=0,
                                pipeline_kwargs={"output_type": "latent"})
            finally:
                after.remove()
    finally:
        before.remove()
    return result, raw, given


def test_eraser_and_pag_terms_add_up_in_instance_order(tiny_pipe, image_and_mask):
    common = [f"sampler.steps={STEPS}", "sampler.guidance_scale=1.0"]
    eraser = load_recipe("attentive-eraser", common)
    pag = load_recipe("pag", [*common, "strategies.pag.sites=self"])
    both = load_recipe(OmegaConf.merge(eraser, {"strategies": {"pag": pag.strategies.pag}}))
    result, raw, given = _run(tiny_pipe, image_and_mask, both)
    assert result.report["rows"] == {"erase": 1, "pag": 1}
    s_e, s_p = float(eraser.strategies.erase.rm_guidance_scale), float(pag.strategies.pag.scale)
    for full, out in zip(raw, given):
        assert full.shape[0] == 3 and out.shape[0] == 1  # rows: output, erase (plain copy), pag (perturbed)
        w, wo, ptb = full[0], full[1], full[2]
        expected = (w + (s_e - 1) * (w - wo)) + s_p * (w - ptb)
        assert torch.equal(out[0], expected)
    alone_e = _run(tiny_pipe, image_and_mask, eraser)[0].image
    alone_p = _run(tiny_pipe, image_and_mask, pag)[0].image
    assert (result.image - alone_e).abs().max() > 1e-4 and (result.image - alone_p).abs().max() > 1e-4
