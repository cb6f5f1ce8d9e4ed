"""Attach, detach, attach again; and diffusers calls made on an attached pipeline."""

from __future__ import annotations

import numpy as np
import pytest

import attnctl
from attnctl.errors import ConfigError
from compat_helpers import (
    assert_harmonpaint_ran,
    assert_identical,
    harmonpaint_attached,
    idle,
    plain,
    running,
    strategies_config,
)


def test_attach_detach_attach(pipe, inputs):
    stock = plain(pipe, inputs)
    originals = dict(pipe.unet.attn_processors)
    first = harmonpaint_attached(pipe, inputs)
    assert_harmonpaint_ran(first, stock)
    assert all(pipe.unet.attn_processors[k] is v for k, v in originals.items())  # the same objects back
    assert_identical(plain(pipe, inputs), stock)
    assert_identical(idle(pipe, inputs), stock)
    assert np.array_equal(harmonpaint_attached(pipe, inputs), first)  # a second attach does the same


def test_second_controller_needs_a_detach(pipe, inputs):
    ctl = attnctl.attach(pipe, strategies_config())
    with pytest.raises(ConfigError, match="already has an attnctl controller attached; detach it first"):
        attnctl.attach(pipe, {})
    ctl.detach()
    with attnctl.attach(pipe, strategies_config()) as again:
        with running(again, pipe, inputs) as call:
            assert plain(pipe, inputs, **call).shape == (1, 64, 64, 3)


def test_set_default_attn_processor_while_attached(pipe, inputs):
    stock = plain(pipe, inputs)
    with attnctl.attach(pipe, {}) as ctl:
        pipe.unet.set_default_attn_processor()
        with running(ctl, pipe, inputs) as call:
            out = plain(pipe, inputs, **call)
    assert np.abs(out - stock).max() < 1e-5


def test_copying_an_attached_unet_is_refused_with_the_fix(pipe):
    import copy

    from diffusers.models.attention_processor import AttnProcessor2_0

    with attnctl.attach(pipe, {}):
        with pytest.raises(attnctl.AttnctlError, match="detach\\(\\) first, copy, then attach"):
            copy.deepcopy(pipe.unet)
    copied = copy.deepcopy(pipe.unet)  # detached: a plain copy
    assert all(type(p) is AttnProcessor2_0 for p in copied.attn_processors.values())
