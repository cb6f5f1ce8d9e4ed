"""Perturbed-attention guidance (``StableDiffusionPAGInpaintPipeline``, PAG on the mid and up
blocks): 3 rows per image (uncond, cond, perturbed) with CFG, 2 without. PAG swaps its
processors in during the call; attnctl wraps them at the next UNet call (SdpaAdapter skipping
the perturbed rows) and runs plain attention at those sites in its guidance pass."""

from __future__ import annotations

import pytest

from compat_helpers import (
    assert_effect_kept,
    assert_harmonpaint_ran,
    assert_identical,
    assert_same,
    harmonpaint,
    harmonpaint_attached,
    idle,
    mean_diff,
    no_run_warnings,
    pag_pipeline,
    plain,
    probed,
)

#: diffusers' PAG inpaint pipeline defaults to strength=0.9999; compare at the same strength 1.0
PAG = {"pag_scale": 3.0}
NO_PAG = {"pag_scale": 0.0}


def test_pag_with_harmonpaint(pipe, inputs):
    ppipe = pag_pipeline(pipe, ("mid", "up"))
    stock, stock_off = plain(ppipe, inputs, **PAG), plain(ppipe, inputs, **NO_PAG)
    assert_identical(idle(ppipe, inputs, **PAG), stock)

    with no_run_warnings():  # every planned site ran, PAG's processors included
        out = harmonpaint(ppipe, inputs, **PAG)
        assert_harmonpaint_ran(out, stock[0])
        hp_off = harmonpaint(ppipe, inputs, **NO_PAG)
        assert_effect_kept(out, hp_off, stock, stock_off)
        # MAKVS (self[-8:], all PAG sites here) acts inside PAG's processors. It acts at the last 2
        # of 3 steps only, so its effect is small on this model (mean 4e-4; rounding is ~1e-7)
        no_makvs = harmonpaint(ppipe, inputs, "strategies.makvs.enabled=false", **PAG)
        assert mean_diff(out, no_makvs) > 1e-4


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_pag_processors_keep_their_perturbed_rows_under_attnctl_core(pipe, inputs, guidance_scale):
    """An identity strategy at every PAG site: attnctl's core computes the unperturbed rows'
    attention inside PAG's processor, the perturbed rows keep identity attention: the output
    is stock PAG."""
    ppipe = pag_pipeline(pipe, ("mid", "up"))
    out, sites = probed(ppipe, inputs, "self@mid,self@up", guidance_scale=guidance_scale, **PAG)
    assert len(sites) == 10
    assert_same(out, plain(ppipe, inputs, guidance_scale=guidance_scale, **PAG))


def test_pag_without_cfg_with_harmonpaint(pipe, inputs):
    """guidance_scale 1: rows (cond, perturbed) per image, PAG's non-CFG processor."""
    ppipe = pag_pipeline(pipe, ("mid", "up"))
    stock = plain(ppipe, inputs, guidance_scale=1.0, **PAG)
    assert_identical(idle(ppipe, inputs, guidance_scale=1.0, **PAG), stock)
    with no_run_warnings():
        out = harmonpaint_attached(ppipe, inputs, guidance_scale=1.0, **PAG)
    assert_harmonpaint_ran(out, stock)
