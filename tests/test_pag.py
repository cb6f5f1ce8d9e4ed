"""``pag``: perturbed-attention and smoothed energy guidance against their references.

- PAG: diffusers' ``StableDiffusionPAGInpaintPipeline`` (same components, ``pag_applied_layers``
  ``mid``), the same latents and seed: the final latents must be bit-identical.
- SEG: the same PAG pipeline with the perturbed-row processor replaced by one written from the
  authors' ``SEGCFGSelfAttnProcessor`` (queries of the last third of the batch blurred on the
  channel grid, the mean above sigma 9999; reflect padding; fp32 kernel), both branches.
- Composition: PAG next to HarmonPaint's SAMS and Prompt-to-Prompt (three row roles).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.runner import Runner

STEPS = 4
SIZE = 128
PROMPT = "a cat"


def _latents():
    return torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def pair():
    """A 128x128 image and mask: the tiny UNet's mid block gets a 2x2 grid (at 64 px its single token
    attends only to itself, so the identity map would change nothing)."""
    from PIL import Image

    rng = np.random.RandomState(1)
    image = Image.fromarray((rng.rand(SIZE, SIZE, 3) * 255).astype("uint8"))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[32:96, 40:88] = 255
    return image, Image.fromarray(mask)


def _reference(tiny_pipe, pair, processors=None, scale=3.0, guidance=7.5):
    from diffusers import DDIMScheduler, StableDiffusionPAGInpaintPipeline

    parts = {k: v for k, v in tiny_pipe.components.items()}
    parts["scheduler"] = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    pipe = StableDiffusionPAGInpaintPipeline(**parts, pag_applied_layers="mid")
    if processors is not None:
        pipe.set_pag_applied_layers("mid", pag_attn_processors=processors)
    pipe.set_progress_bar_config(disable=True)
    image, mask = pair
    return pipe(prompt=PROMPT, image=image, mask_image=mask, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=guidance,
                pag_scale=scale, strength=1.0, latents=_latents(), output_type="latent",
                generator=torch.Generator().manual_seed(0)).images[0]


def _ours(tiny_pipe, pair, recipe="pag", overrides=(), guidance=7.5):
    config = load_recipe(recipe, [f"sampler.steps={STEPS}", f"sampler.guidance_scale={guidance}", *overrides])
    with Runner(tiny_pipe, config) as runner:
        result = runner(prepare_inputs(*pair, warn=False), PROMPT, seed=0,
                        pipeline_kwargs={"output_type": "latent", "latents": _latents()})
    return result.image


def test_pag_is_bit_identical_to_diffusers_pag_inpaint_pipeline(tiny_pipe, pair):
    theirs = _reference(tiny_pipe, pair)
    ours = _ours(tiny_pipe, pair)
    plain = _ours(tiny_pipe, pair, "sdi")
    assert not torch.equal(ours, plain)  # the control: the guidance changes the image
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def test_pag_without_cfg_matches_too(tiny_pipe, pair):
    theirs = _reference(tiny_pipe, pair, guidance=1.0)
    ours = _ours(tiny_pipe, pair, guidance=1.0)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


# -- SEG: the authors' processor, written from their pipeline ------------------------------------------------


def _authors_blur(img, kernel_size, sigma):
    height = img.shape[-1]
    kernel_size = min(kernel_size, height - (height % 2 - 1))
    x = torch.linspace(-(kernel_size - 1) * 0.5, (kernel_size - 1) * 0.5, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k = (pdf / pdf.sum()).to(device=img.device, dtype=img.dtype)
    k2 = torch.mm(k[:, None], k[None, :]).expand(img.shape[-3], 1, kernel_size, kernel_size)
    pad = [kernel_size // 2] * 4
    return F.conv2d(F.pad(img, pad, mode="reflect"), k2, groups=img.shape[-3])


class AuthorsSEG:
    """Self-attention with the last 1/parts of the batch's queries blurred (their SEGCFGSelfAttnProcessor)."""

    def __init__(self, sigma, parts):
        self.sigma, self.parts = sigma, parts

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = q.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        side = math.isqrt(n)
        *rest, ptb = q.chunk(self.parts)
        ptb = ptb.permute(0, 1, 3, 2).reshape(b // self.parts, attn.heads * d, side, side)
        if self.sigma > 9999.0:
            ptb = ptb.mean(dim=(-2, -1), keepdim=True).expand_as(ptb)
        else:
            size = math.ceil(6 * self.sigma) + 1 - math.ceil(6 * self.sigma) % 2
            ptb = _authors_blur(ptb, size, self.sigma)
        ptb = ptb.reshape(b // self.parts, attn.heads, d, n).permute(0, 1, 3, 2)
        out = F.scaled_dot_product_attention(torch.cat([*rest, ptb]), k, v)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out))


@pytest.mark.parametrize("sigma", [9999999.0, 0.6])
def test_seg_matches_the_authors_processor(tiny_pipe, pair, sigma):
    theirs = _reference(tiny_pipe, pair, processors=(AuthorsSEG(sigma, 3), AuthorsSEG(sigma, 2)))
    ours = _ours(tiny_pipe, pair, "seg", (f"strategies.seg.blur_sigma={sigma}",))
    plain = _ours(tiny_pipe, pair, "pag")
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - plain).abs().max() > 1e-3  # the control: SEG is not PAG
