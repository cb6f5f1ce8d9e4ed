"""Fused QKV projections (``pipe.fuse_qkv_projections()``: ``FusedAttnProcessor2_0``), before
and after attaching, and ``unfuse_qkv_projections`` after a detach. Fusing changes the
projection kernels, not the result: with HarmonPaint on, fused equals unfused to rounding."""

from __future__ import annotations

import attnctl
from attnctl.processor import ControlledProcessor
from compat_helpers import (
    assert_harmonpaint_ran,
    assert_identical,
    assert_same,
    harmonpaint,
    idle,
    plain,
    running,
    strategies_config,
)


def processor_classes(pipe) -> set[str]:
    return {type(p).__name__ for p in pipe.unet.attn_processors.values()}


def test_fused_before_attach(pipe, inputs):
    hp_unfused = harmonpaint(pipe, inputs)
    pipe.fuse_qkv_projections()
    assert processor_classes(pipe) == {"FusedAttnProcessor2_0"}
    stock = plain(pipe, inputs)
    assert_identical(idle(pipe, inputs), stock)
    out = harmonpaint(pipe, inputs)
    assert_harmonpaint_ran(out, stock[0])
    assert_same(out, hp_unfused)


def test_fused_after_attach(pipe, inputs):
    with attnctl.attach(pipe, strategies_config()) as ctl:
        with running(ctl, pipe, inputs) as call:
            hp_unfused = plain(pipe, inputs, **call)
        pipe.fuse_qkv_projections()
        with running(ctl, pipe, inputs) as call:
            out = plain(pipe, inputs, **call)
        assert {type(p.original).__name__ for p in ctl.processors.values()} == {"FusedAttnProcessor2_0"}
    stock = plain(pipe, inputs)  # fused, detached
    assert_harmonpaint_ran(out, stock)
    assert_same(out, hp_unfused)


def test_detach_unfuse_attach_again(pipe, inputs):
    """unfuse_qkv_projections puts back what was there at fuse time: the detached controller's
    wrappers. They are stale, run the original, and the next attach unwraps them."""
    stock = plain(pipe, inputs)
    ctl = attnctl.attach(pipe, {})
    pipe.fuse_qkv_projections()
    with running(ctl, pipe, inputs) as call:
        fused_idle = plain(pipe, inputs, **call)
    ctl.detach()
    assert_identical(fused_idle, plain(pipe, inputs))
    pipe.unfuse_qkv_projections()
    assert processor_classes(pipe) == {"ControlledProcessor"}  # the stale wrappers
    assert_identical(plain(pipe, inputs), stock)

    assert_identical(idle(pipe, inputs), stock)  # attach works again
    out = harmonpaint(pipe, inputs)
    assert_harmonpaint_ran(out, stock[0])
    assert not any(isinstance(p, ControlledProcessor) for p in pipe.unet.attn_processors.values())
    assert processor_classes(pipe) == {"AttnProcessor2_0"}
