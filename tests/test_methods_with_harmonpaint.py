"""Each method next to HarmonPaint: the combined recipe runs, and both still act.

"Acts" is measured on the images: the combination differs from HarmonPaint alone (the
method acted) and from the method alone (HarmonPaint acted). The control: the same
combination with the method's entry disabled is HarmonPaint alone, bit for bit, so any
difference is the method's doing, not noise. The tiny model is random, so attention edits
move its images little (MasaCtrl at the authors' sites: 0.2 of 255 on average); MasaCtrl
runs here on every self site from step 0.
The exact combined equations are checked site by site in tests/test_composition_stages.py
and in each method's test file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import harmonpaint_recipe as hp
from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.runner import Runner

STEPS = 4
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: images are uint8; the control below differs by exactly 0
EFFECT = 0.1

METHODS = {
    "p2p": ("p2p-replace", "a blue owl", ["strategies.p2p.source_prompt=a red owl", "strategies.p2p.blend_words=[red,blue]"]),
    "masa": ("masactrl", "a small owl", ["strategies.masa.source_prompt=a large owl", "strategies.masa.start_step=0",
                                        "strategies.masa.sites=self"]),
    "style": ("style-aligned", "a small owl", ["strategies.style.reference_prompt=an owl in origami style"]),
    "excite": ("attend-excite", "a small owl", ["strategies.excite.tokens=[2,3]"]),
    # every self site: at 64 px the mid block's single token attends only to itself
    "pag": ("pag", "a small owl", ["strategies.pag.sites=self"]),
    "seg": ("seg", "a small owl", ["strategies.seg.sites=self"]),
    "ref": ("reference-only", "a small owl", [f"strategies.ref.image={EXAMPLES / 'rocket.png'}"]),
    "vsp": ("visual-style-prompting", "a small owl", []),
    "hd": ("hd-painter", "a small owl", ["strategies.hd.painta_until=-1"]),
    "masa-real": ("masactrl-real", "a small owl", [f"strategies.masa.source_image={EXAMPLES / 'rocket.png'}",
                                                  "strategies.masa.start_step=0", "strategies.masa.sites=self"]),
    "style-real": ("style-aligned-real", "a small owl", [f"strategies.style.reference_image={EXAMPLES / 'rocket.png'}",
                                                        "strategies.style.inversion_offset=1"]),
}
#: the instance name in the recipe where it is not the case's name
INSTANCE = {"masa-real": "masa", "style-real": "style"}


@pytest.fixture(scope="module")
def pipe(tiny_pipe_dir):
    return hp.load_pipeline(load_recipe("sdi", [f"model.pretrained={tiny_pipe_dir}", "model.device=cpu"]))


@pytest.mark.parametrize("instance", list(METHODS))
def test_method_and_harmonpaint_both_act(pipe, image_and_mask, instance):
    recipe, prompt, overrides = METHODS[instance]
    inputs = prepare_inputs(*image_and_mask)
    common = [f"sampler.steps={STEPS}"]

    def image(cfg) -> np.ndarray:
        with Runner(pipe, cfg) as runner:
            return np.asarray(runner(inputs, prompt, seed=0).image, dtype=np.float64)

    method_cfg = load_recipe(recipe, [*common, *overrides])
    harmonpaint_cfg = load_recipe("harmonpaint", common)
    # HarmonPaint's recipe plus the method's strategy entry, as a user's YAML with `defaults: [harmonpaint]` would be
    name = INSTANCE.get(instance, instance)
    combined = load_recipe(OmegaConf.merge(harmonpaint_cfg, {"strategies": {name: method_cfg.strategies[name]}}))
    disabled = load_recipe(OmegaConf.merge(combined, {"strategies": {name: {"enabled": False}}}))
    method, harmonpaint, both = image(method_cfg), image(harmonpaint_cfg), image(combined)
    assert np.array_equal(image(disabled), harmonpaint)  # the control
    assert np.abs(both - harmonpaint).mean() > EFFECT, "the method did nothing next to HarmonPaint"
    assert np.abs(both - method).mean() > EFFECT, "HarmonPaint did nothing next to the method"


@pytest.mark.parametrize("instance", list(METHODS))
def test_method_recipe_runs_on_sdxl(image_and_mask, instance):
    """Each method's recipe, as shipped, on an SDXL-shaped inpainting pipeline (two text encoders, pooled
    embeddings, 70 self-attention sites)."""
    from attnctl.testing.tiny import tiny_sdxl_model

    recipe, prompt, overrides = METHODS[instance]
    pipe = tiny_sdxl_model()
    with Runner(pipe, load_recipe(recipe, ["sampler.steps=2", *overrides])) as runner:
        result = runner(prepare_inputs(*image_and_mask), prompt, seed=0)
    assert result.image.size == (64, 64) and np.isfinite(np.asarray(result.image, dtype=np.float64)).all()
