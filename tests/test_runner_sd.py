"""The runner on SD-style inpainting pipelines (9-channel and 4-channel UNets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.runner import Runner, prompt_token_indices

STEPS = ["sampler.steps=3"]


def run(pipe, recipe, inputs, prompt="a cat", seed=0):
    with Runner(pipe, recipe) as runner:
        return np.asarray(runner(inputs, prompt, seed).image)


def test_prompt_token_indices_are_the_prompt_tokens(tiny_pipe):
    ids = tiny_pipe.tokenizer("a cat").input_ids
    assert prompt_token_indices(tiny_pipe.tokenizer, "a cat") == list(range(1, len(ids) - 1))
    assert ids[0] == tiny_pipe.tokenizer.bos_token_id and ids[-1] == tiny_pipe.tokenizer.eos_token_id
    assert len(prompt_token_indices(tiny_pipe.tokenizer, "x" * 500)) == 75  # truncated like the pipeline


def test_sdi_equals_the_stock_pipeline(tiny_pipe, image_and_mask):
    inputs = prepare_inputs(*image_and_mask)
    ours = run(tiny_pipe, load_recipe("sdi", ["sampler.steps=2"]), inputs, seed=7)
    stock = tiny_pipe(
        prompt="a cat", image=inputs.image, mask_image=inputs.mask, height=64, width=64, num_inference_steps=2,
        guidance_scale=7.5, strength=1.0, generator=torch.Generator().manual_seed(7),
    ).images[0]
    assert np.array_equal(ours, np.asarray(stock))


def test_run_gets_explicit_layout_mask_and_tokens(tiny_pipe, image_and_mask, monkeypatch):
    inputs = prepare_inputs(*image_and_mask)
    seen = {}
    for guidance, branches in ((7.5, ("uncond", "cond")), (1.0, ("cond",))):
        recipe = load_recipe("sdi", ["sampler.steps=1", f"sampler.guidance_scale={guidance}"])
        with Runner(tiny_pipe, recipe) as runner:
            original = runner.controller.run

            def spy(layout, mask=None, token_indices=(), prompts=()):
                seen.update(layout=layout, mask=mask, tokens=token_indices, prompts=prompts)
                return original(layout, mask=mask, token_indices=token_indices, prompts=prompts)

            monkeypatch.setattr(runner.controller, "run", spy)
            runner(inputs, "a cat", 0)
        assert seen["layout"].branches == branches
        assert seen["layout"].images == (0,) * len(branches)
        assert torch.equal(seen["mask"], torch.from_numpy(np.asarray(inputs.mask) / 255.0).float())
        assert seen["tokens"] == [prompt_token_indices(tiny_pipe.tokenizer, "a cat")]
        assert seen["prompts"] == ["a cat"]


def test_harmonpaint_changes_the_output(tiny_pipe, image_and_mask):
    inputs = prepare_inputs(*image_and_mask)
    a = run(tiny_pipe, load_recipe("harmonpaint", STEPS), inputs, seed=1)
    sdi = run(tiny_pipe, load_recipe("sdi", STEPS), inputs, seed=1)
    assert np.abs(a.astype(int) - sdi.astype(int)).max() > 0
    # the runner detaches: the pipeline's processors are the stock ones again
    assert all(type(p).__module__.startswith("diffusers") for p in tiny_pipe.unet.attn_processors.values())


def test_four_channel_unet_through_latent_blending(tiny_pipe, image_and_mask):
    from diffusers import UNet2DConditionModel

    from attnctl.testing import TINY_UNET_CONFIG

    torch.manual_seed(0)
    tiny_pipe.unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "in_channels": 4})
    inputs = prepare_inputs(*image_and_mask)
    out = run(tiny_pipe, load_recipe("harmonpaint", STEPS), inputs, seed=2)
    sdi = run(tiny_pipe, load_recipe("sdi", STEPS), inputs, seed=2)
    assert out.shape == (64, 64, 3) and np.abs(out.astype(int) - sdi.astype(int)).max() > 0
