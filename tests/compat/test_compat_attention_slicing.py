"""Attention slicing (``pipe.enable_attention_slicing()``: ``SlicedAttnProcessor`` everywhere),
before and after attaching. Slicing changes how attention is computed, not what: with
HarmonPaint on, sliced equals unsliced to float rounding."""

from __future__ import annotations

import attnctl
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


def test_slicing_enabled_before_attach(pipe, inputs):
    hp_unsliced = harmonpaint(pipe, inputs)
    pipe.enable_attention_slicing()
    stock = plain(pipe, inputs)
    assert_identical(idle(pipe, inputs), stock)
    out = harmonpaint(pipe, inputs)
    assert_harmonpaint_ran(out, stock[0])
    assert_same(out, hp_unsliced)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"SlicedAttnProcessor"}


def test_slicing_enabled_after_attach(pipe, inputs):
    with attnctl.attach(pipe, {}) as ctl:
        pipe.enable_attention_slicing()
        with running(ctl, pipe, inputs) as call:
            idle_out = plain(pipe, inputs, **call)
    stock = plain(pipe, inputs)  # still sliced: detach keeps the user's processors
    assert_identical(idle_out, stock)
    pipe.disable_attention_slicing()

    with attnctl.attach(pipe, strategies_config()) as ctl:
        with running(ctl, pipe, inputs) as call:
            hp_unsliced = plain(pipe, inputs, **call)
        pipe.enable_attention_slicing()
        with running(ctl, pipe, inputs) as call:
            out = plain(pipe, inputs, **call)
        assert {type(p.original).__name__ for p in ctl.processors.values()} == {"SlicedAttnProcessor"}
    assert_harmonpaint_ran(out, stock)
    assert_same(out, hp_unsliced)
