"""ControlNet inpainting (``StableDiffusionControlNetInpaintPipeline``) with a tiny random
``ControlNetModel``. The pipeline computes the residuals from the unguided latent before each
UNet call; attnctl's guidance pass reuses them, cut to the conditional rows."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from compat_helpers import (
    assert_effect_kept,
    assert_harmonpaint_ran,
    assert_identical,
    assert_same,
    build_tiny_controlnet,
    controlnet_pipeline,
    harmonpaint,
    idle,
    plain,
)


@pytest.fixture
def control():
    """Pipeline arguments: a random control image."""
    rng = np.random.RandomState(7)
    return {"control_image": Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))}


def test_controlnet_with_harmonpaint(pipe, inputs, control):
    cpipe = controlnet_pipeline(pipe, build_tiny_controlnet())
    off = {**control, "controlnet_conditioning_scale": 0.0}
    stock, stock_off = plain(cpipe, inputs, **control), plain(cpipe, inputs, **off)
    assert_identical(idle(cpipe, inputs, **control), stock)

    calls = []
    hook = cpipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(
            (kwargs["sample"].shape[0] if "sample" in kwargs else args[0].shape[0],
             [r.shape[0] for r in kwargs.get("down_block_additional_residuals") or ()],
             getattr(kwargs.get("mid_block_additional_residual"), "shape", (None,))[0])),
        with_kwargs=True,
    )
    try:
        out = harmonpaint(cpipe, inputs, **control)
    finally:
        hook.remove()
    assert_harmonpaint_ran(out, stock[0])
    # the steer loss ran: guidance passes on the conditional row, every residual cut to that row
    guidance = [c for c in calls if c[0] == 1]
    assert guidance, "no guidance pass ran"
    assert all(set(residuals) == {1} and mid == 1 for _, residuals, mid in guidance)
    assert all(set(residuals) == {2} and mid == 2 for batch, residuals, mid in calls if batch == 2)

    # (c) the ControlNet's residuals still act with HarmonPaint on ...
    hp_off = harmonpaint(cpipe, inputs, **off)
    assert_effect_kept(out, hp_off, stock, stock_off)
    # ... and at conditioning scale 0 (zero residuals) HarmonPaint is what it is without a ControlNet
    assert_same(hp_off, harmonpaint(pipe, inputs))
