"""The runner on an SDXL inpainting pipeline: added text embeds / time ids in the guidance pass."""

from __future__ import annotations

import numpy as np
import pytest

from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.runner import Runner


@pytest.fixture(scope="module")
def sdxl_pipe():
    from attnctl.testing import build_tiny_inpaint_pipeline

    pipe = build_tiny_inpaint_pipeline(seed=0, kind="sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_harmonpaint_sdxl_guidance_pass_slices_added_cond_kwargs(sdxl_pipe, image_and_mask):
    inputs = prepare_inputs(*image_and_mask)
    # 3 DDIM steps: t = 667 (structure phase: one guidance pass), 334, 1
    recipe = load_recipe("harmonpaint-sdxl", ["sampler.steps=3"])
    calls = []

    def record(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        added = kwargs["added_cond_kwargs"]
        calls.append((sample.shape[0], added["text_embeds"].shape[0], added["time_ids"].shape[0]))

    with Runner(sdxl_pipe, recipe) as runner:
        handle = sdxl_pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
        try:
            image = np.asarray(runner(inputs, "a cat", seed=0).image)
        finally:
            handle.remove()
    # guidance pass on the cond row only (rows of added_cond_kwargs sliced with it), then 3 CFG calls
    assert calls == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert image.shape == (64, 64, 3)
    assert np.isfinite(image).all() and image.std() > 0
