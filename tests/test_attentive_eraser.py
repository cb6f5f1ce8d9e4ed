"""``attentive_eraser`` against the authors' attention editor and guidance, written literally here.

The reference: the stock pipeline with two identical rows ``[wo, w]`` (prompt ``""`` twice, the
same initial latent, no classifier-free guidance); explicit-softmax processors at the decoder's
self-attention split the batch with ``chunk(2)``: ``wo`` attends as usual; ``w`` gets
``sim + finfo.min`` on masked keys and, while ``step <= ss_steps``, a second map
``ss_scale * sim + finfo.min`` blended in by the mask per query (``out_fg * m + out_bg * (1 - m)``);
masks are the latent-size mask max-pooled to each grid and rounded. The UNet output becomes
``eps_wo + s (eps_w - eps_wo)`` for both rows. The plugin runs on the plain pipeline with one row
and its added copy; final latents must agree to 1e-9 (float64). The tiny model's 2x2 decoder grid
is covered by the mask, so the case where every key is masked (uniform attention, their
``finfo.min`` absorbing the logits) is part of every run.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attnctl.errors import RunError
from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.runner import Runner

STEPS = 4


class Editor:
    def __init__(self, latent_mask, ss_steps, ss_scale, scale):
        self.latent_mask, self.ss_steps, self.ss_scale, self.scale = latent_mask, ss_steps, ss_scale, scale
        self.step = 0

    def grid_mask(self, tokens):
        h0, w0 = self.latent_mask.shape[-2:]
        side = int(round((tokens * h0 / w0) ** 0.5))
        h, w = side, tokens // side
        return F.max_pool2d(self.latent_mask[None, None], (h0 // h, w0 // w)).round().reshape(-1)


class AuthorsProcessor:
    def __init__(self, editor):
        self.editor = editor

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ed = self.editor
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = q.shape[-1] // attn.heads
        q, k, v = (t.reshape(b, n, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        sim = q @ k.transpose(-1, -2) * attn.scale
        (sim_wo, sim_w), (v_wo, v_w) = sim.chunk(2), v.chunk(2)
        out_wo = sim_wo.softmax(-1) @ v_wo
        mask = ed.grid_mask(n)
        penalty = mask.masked_fill(mask == 1, torch.finfo(sim.dtype).min)
        if ed.step <= ed.ss_steps:
            out_bg = (sim_w + penalty).softmax(-1) @ v_w
            out_fg = (ed.ss_scale * sim_w + penalty).softmax(-1) @ v_w
            m = mask.reshape(-1, 1)
            out_w = out_fg * m + out_bg * (1 - m)
        else:
            out_w = (sim_w + penalty).softmax(-1) @ v_w
        out = torch.cat([out_wo, out_w]).transpose(1, 2).reshape(b, n, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))


@pytest.fixture
def pipe64(tiny_pipe):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    return tiny_pipe.to(torch.float64)


def _latents():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _authors(pipe, image_and_mask, ss_steps=9, ss_scale=0.3, scale=9.0):
    from attnctl.run_state import _as_mask_batch

    image, mask = image_and_mask
    prepared = prepare_inputs(image, mask, warn=False)
    latent_mask = F.interpolate(_as_mask_batch(torch.from_numpy(prepared.mask_array)), size=(8, 8), mode="nearest")[0, 0]
    editor = Editor(latent_mask.double(), ss_steps, ss_scale, scale)
    unet = copy.deepcopy(pipe.unet)
    unet.set_attn_processor({name: AuthorsProcessor(editor) if name.startswith("up_blocks") and "attn1" in name else proc
                             for name, proc in unet.attn_processors.items()})

    def sarg(module, args, output):
        wo, w = output[0].chunk(2)
        guided = wo + scale * (w - wo)
        editor.step += 1
        return (torch.cat([guided, guided]),)

    unet.register_forward_hook(sarg)
    own, pipe.unet = pipe.unet, unet
    try:
        out = pipe(prompt=["", ""], image=image, mask_image=mask, num_inference_steps=STEPS, guidance_scale=1.0,
                   strength=1.0, latents=torch.cat([_latents()] * 2), output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    finally:
        pipe.unet = own
    assert torch.equal(out[0], out[1])  # the rows stay one image
    return out[0]


def _ours(pipe, image_and_mask, overrides=(), recipe="attentive-eraser"):
    config = load_recipe(recipe, [f"sampler.steps={STEPS}", "sampler.guidance_scale=1.0", *overrides])
    with Runner(pipe, config) as runner:
        return runner(prepare_inputs(*image_and_mask, warn=False), "", seed=0,
                      pipeline_kwargs={"output_type": "latent", "latents": _latents()}).image


@pytest.mark.parametrize("ss_steps", [9, 1, -1])
def test_matches_the_authors_editor_and_guidance(pipe64, image_and_mask, ss_steps):
    theirs = _authors(pipe64, image_and_mask, ss_steps=ss_steps)
    ours = _ours(pipe64, image_and_mask, [f"strategies.erase.ss_steps={ss_steps}"])
    plain = _ours(pipe64, image_and_mask, recipe="sdi")
    assert (ours - plain).abs().max() > 1e-3  # the control: the eraser changes the image
    assert (ours - theirs).abs().max() < 1e-9


def test_classifier_free_guidance_is_refused_with_the_fix(tiny_pipe, image_and_mask):
    config = load_recipe("attentive-eraser", ["sampler.steps=2", "sampler.guidance_scale=7.5"])
    with Runner(tiny_pipe, config) as runner, pytest.raises(RunError, match="sampler.guidance_scale=1"):
        runner(prepare_inputs(*image_and_mask, warn=False), "", seed=0)


def test_runs_on_sdxl(image_and_mask):
    """The recipe as shipped on an SDXL-shaped inpainting pipeline (the authors' primary model)."""
    import numpy as np

    from attnctl.testing.tiny import tiny_sdxl_model

    pipe = tiny_sdxl_model()
    with Runner(pipe, load_recipe("attentive-eraser", ["sampler.steps=2"])) as runner:
        result = runner(prepare_inputs(*image_and_mask, warn=False), "", seed=0)
    assert result.image.size == (64, 64) and np.isfinite(np.asarray(result.image, dtype=np.float64)).all()
    assert result.report["rows"] == {"erase": 1}
