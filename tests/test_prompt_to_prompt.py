"""Prompt-to-Prompt against a naive reference written from the authors' controller.

The reference runs the stock pipeline with ``prompt=[source, target]`` (both images from the
same latent) on a copy of the UNet whose every attention module computes an explicit softmax
and edits the conditional half of the batch as the authors' ``AttentionControlEdit`` does
(``attn[h // 2:]``, base = row 0, replaced = row 1): cross maps always, self maps in the
window at sites with at most 16x16 queries; the maps are stored *after* the edit and summed
over steps; local blend runs in the step callback. The images are 128 px, so the latent is
16x16 and the blend sites (latent / 4, the authors' 16x16 sites at 512 px) are 4x4.

Both run in float64, so the comparison over all steps (classifier-free guidance amplifies
fp32 rounding from step to step) checks the equations, not the rounding.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnctl
from strategies import p2p_tokens as tok

sys.path.insert(0, str(Path(__file__).parent))

STEPS = 5
SIZE = 128


class NaiveP2P:
    """The authors' edit controller, literally (explicit maps, cond half, in-place edit after storing)."""

    def __init__(self, unet, source, target, tokenizer, edit, cross=0.8, self_steps=0.4, equalizer=None,
                 blend=None, threshold=0.3):
        self.step = 0
        self.alpha = tok.time_word_alpha(STEPS, cross, source, [target], tokenizer)[:, 0, 0, 0]
        self.edit = edit
        self.mapper = tok.replacement_mapper(source, target, tokenizer) if edit == "replace" else None
        if edit == "refine":
            self.gather, self.alphas = tok.refinement_mapper(source, target, tokenizer)
        self.equalizer = tok.equalizer(target, equalizer, tokenizer) if equalizer else None
        self.self_window = (0, int(STEPS * self_steps))
        self.store: dict[str, torch.Tensor] = {}
        self.blend, self.threshold = blend, threshold
        if blend:
            self.words = [tok.word_token_positions(source, blend[0], tokenizer),
                          tok.word_token_positions(target, blend[1], tokenizer)]
        for name, module in unet.named_modules():
            if name.endswith("attn1") or name.endswith("attn2"):
                module.set_processor(_Processor(self, name))

    def replace_cross(self, base, replace):
        if self.edit == "replace":
            new = torch.einsum("hpw,wn->hpn", base, self.mapper.to(base))
        elif self.edit == "refine":
            new = base[:, :, self.gather] * self.alphas.to(base) + replace * (1 - self.alphas.to(base))
        else:
            new = base
        if self.equalizer is not None:
            new = new * self.equalizer.to(base)
        return new

    def edit_map(self, name, attn, is_cross, grid):
        h = attn.shape[0] // 2
        cond = attn[h:]  # [src, tgt] x heads x N x M
        if is_cross and self.blend and grid == (SIZE // 8 // 4,) * 2:
            self.store.setdefault(name, None)
            stored = cond  # a view: the edit below shows in it, as in the authors' store
        else:
            stored = None
        if is_cross:
            a = self.alpha[self.step].to(cond)
            cond[1] = self.replace_cross(cond[0], cond[1]) * a + (1 - a) * cond[1]
        elif self.self_window[0] <= self.step < self.self_window[1] and cond.shape[-2] <= 16 ** 2:
            cond[1] = cond[0]
        if stored is not None:
            self.store[name] = stored.mean(1) if self.store[name] is None else self.store[name] + stored.mean(1)

    def local_blend(self, latents, source_latents):
        maps = torch.stack([m for m in self.store.values()])  # [sites, 2, HW, 77]
        masks = []
        for i in range(2):
            word = maps[:, i][..., self.words[i]].sum(-1).mean(0)
            side = int(word.numel() ** 0.5)
            m = F.max_pool2d(word.reshape(1, 1, side, side), (3, 3), (1, 1), padding=(1, 1))
            m = F.interpolate(m, size=latents.shape[2:])
            m = m / m.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
            masks.append(m.gt(self.threshold))
        mask = (masks[0] + masks[1]).float()
        return source_latents + mask * (latents - source_latents)


class _Processor:
    def __init__(self, ctl, name):
        self.ctl, self.name = ctl, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        is_cross = encoder_hidden_states is not None
        b, n, _ = hidden_states.shape
        ctx = encoder_hidden_states if is_cross else hidden_states
        heads = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        d = q.shape[-1] // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * d ** -0.5).softmax(-1)
        side = int(n ** 0.5)
        self.ctl.edit_map(self.name, probs, is_cross, (side, side))
        out = (probs @ v).transpose(1, 2).reshape(b, n, heads * d)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def _inputs():
    rng = np.random.RandomState(0)
    from PIL import Image

    image = Image.fromarray((rng.rand(SIZE, SIZE, 3) * 255).astype("uint8"))
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[32:96, 40:88] = 255
    return image, Image.fromarray(m), m


def _kwargs(image, mask, prompt, latents, **extra):
    return dict(prompt=prompt, image=image, mask_image=mask, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=7.5, output_type="latent", latents=latents,
                generator=torch.Generator().manual_seed(0), **extra)


@pytest.fixture
def pipe(tiny_pipe):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    return tiny_pipe.to(dtype=torch.float64)


def _naive(pipe, source, target, z, **settings):
    from diffusers import StableDiffusionInpaintPipeline

    unet = copy.deepcopy(pipe.unet)
    ctl = NaiveP2P(unet, source, target, pipe.tokenizer, **settings)
    ref = StableDiffusionInpaintPipeline(**{**pipe.components, "unet": unet})
    ref.set_progress_bar_config(disable=True)

    def callback(p, i, t, kwargs):
        latents = kwargs["latents"]
        if ctl.blend:
            latents = ctl.local_blend(latents, latents[:1].expand_as(latents))
        ctl.step += 1
        return {"latents": latents}

    image, mask, _ = _inputs()
    return ref(**_kwargs(image, mask, [source, target], torch.cat([z, z]), callback_on_step_end=callback)).images


def _ours(pipe, source, target, z, **params):
    config = {"strategies": {"p2p": {"strategy": "prompt_to_prompt", "source_prompt": source, "keep_source": True,
                                     **params}}}
    image, mask, m = _inputs()
    ctl = attnctl.attach(pipe, config)
    layout = attnctl.BatchLayout.for_call(pipe, prompt=target, guidance_scale=7.5)
    with ctl.run(layout, mask=torch.from_numpy(m), prompts=[target]) as state:
        out = pipe(**_kwargs(image, mask, target, z)).images
    ctl.detach()
    return out, state


CASES = {
    "replace": ("a red cube", "a blue cube", dict(edit="replace"), {}),
    "refine": ("a cube", "a red cube", dict(edit="refine"), {}),
    "reweight": ("a red cube", "a red cube", dict(edit="reweight", equalizer={"cube": 3.0}),
                 dict(equalizer={"cube": 3.0})),
    "replace+reweight+blend": ("a red cube", "a blue cube",
                               dict(edit="replace", equalizer={"blue": 2.0}, blend=("red", "blue")),
                               dict(equalizer={"blue": 2.0}, blend_words=["red", "blue"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_the_authors_controller(pipe, case):
    source, target, naive_settings, params = CASES[case]
    edit = naive_settings.pop("edit") if "edit" in naive_settings else "replace"
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = _naive(pipe, source, target, z, edit=edit, **naive_settings)
    out, state = _ours(pipe, source, target, z, edit=edit, **params)
    assert (out[0] - expected[1]).abs().max() < 1e-5
    assert (state.row_outputs["p2p"][0] - expected[0]).abs().max() < 1e-5
    if "blend" in naive_settings:
        report = state.report()
        assert set(report["explicit_maps"]) == {"cross[4]", "cross[5]", "cross[7]", "cross[8]", "cross[9]"}
        # one step's maps at a time in the store the attention calls write, their sums over the steps beside it
        step, sums = report["stores"]["p2p"], report["stores"]["p2p/blend"]
        assert step["bytes"] == 0 and 0 < step["peak_bytes"] <= sums["bytes"]


def test_the_source_is_a_stock_image_and_uncond_rows_are_untouched(pipe):
    z = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    image, mask, _ = _inputs()
    # each prompt encoded alone, as the run encodes them, then denoised side by side
    target = pipe.encode_prompt("a blue cube", "cpu", 1, True)
    source = pipe.encode_prompt("a red cube", "cpu", 1, False)
    both = pipe(**_kwargs(image, mask, None, torch.cat([z, z]), prompt_embeds=torch.cat([target[0], source[0]]),
                          negative_prompt_embeds=torch.cat([target[1], target[1]]))).images
    out, state = _ours(pipe, "a red cube", "a blue cube", z)
    assert torch.equal(state.row_outputs["p2p"][0], both[1])  # the source: bit for bit its own stock run
    assert (out[0] - both[0]).abs().max() > 1e-3  # the target was edited


def test_bad_settings_are_named(pipe):
    with pytest.raises(attnctl.ConfigError, match="source_prompt is empty"):
        attnctl.attach(pipe, {"strategies": {"p2p": {"strategy": "prompt_to_prompt"}}})
    with pytest.raises(attnctl.ConfigError, match="edit must be one of"):
        attnctl.attach(pipe, {"strategies": {"p2p": {"strategy": "prompt_to_prompt", "source_prompt": "a",
                                                     "edit": "swap"}}})
