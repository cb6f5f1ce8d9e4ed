"""Several images per call: ``num_images_per_prompt=2`` and two prompts, through ``attnctl.attach``
with ``BatchLayout.for_call``."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.errors import ConfigError
from compat_helpers import (
    assert_harmonpaint_ran,
    assert_identical,
    assert_same,
    harmonpaint_attached,
    idle,
    mean_diff,
    plain,
    running,
    strategies_config,
)

BATCHES = [
    pytest.param(dict(prompt="a cat", num_images_per_prompt=2), id="one-prompt-two-images"),
    pytest.param(dict(prompt=["a cat", "a dog"]), id="two-prompts"),
]


@pytest.mark.parametrize("batch", BATCHES)
def test_batch_with_harmonpaint(pipe, inputs, batch):
    stock = plain(pipe, inputs, **batch)
    assert stock.shape == (2, 64, 64, 3)
    assert_identical(idle(pipe, inputs, **batch), stock)

    out = harmonpaint_attached(pipe, inputs, **batch)
    assert_harmonpaint_ran(out, stock)
    for image, stock_image in zip(out, stock):  # every image is worked on
        assert mean_diff(image, stock_image) > 1e-3


@pytest.mark.parametrize("batch", BATCHES)
def test_images_of_a_batch_are_independent(pipe, inputs, batch):
    """(c) With the same starting latent in every row, each image of the batch is the single-image
    result of its own prompt: rows are told apart by the layout, not mixed by it."""
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    prompts = [batch["prompt"]] * 2 if isinstance(batch["prompt"], str) else batch["prompt"]
    alone = {p: harmonpaint_attached(pipe, inputs, prompt=p, latents=latent)[0] for p in set(prompts)}
    out = harmonpaint_attached(pipe, inputs, latents=latent.repeat(2, 1, 1, 1), **batch)
    for image, prompt in zip(out, prompts):
        assert_same(image, alone[prompt], tol=1e-4)  # batched kernels round differently (~3e-6)
    if prompts[0] != prompts[1]:
        assert mean_diff(out[0], out[1]) > 1e-3  # the prompts' own effect


def test_layout_that_does_not_match_the_call_is_a_config_error(pipe, inputs):
    with attnctl.attach(pipe, strategies_config()) as ctl:
        with pytest.raises(ConfigError, match="BatchLayout.for_call"):
            with running(ctl, pipe, inputs):  # layout for one image
                plain(pipe, inputs, num_images_per_prompt=2)
