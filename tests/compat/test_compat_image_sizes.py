"""Sizes that are not powers of two nor square: 72x96 and 96x72 (latents 9x12 / 12x9, grids
ceil-halved at every level; the UNet upsamples to its skip connections' sizes)."""

from __future__ import annotations

import pytest

from compat_helpers import assert_harmonpaint_ran, assert_identical, harmonpaint, idle, make_inputs, no_run_warnings, plain


@pytest.mark.parametrize("width,height", [(72, 96), (96, 72)], ids=["72x96", "96x72"])
def test_odd_size_with_harmonpaint(pipe, width, height):
    inputs = make_inputs(width, height)
    stock = plain(pipe, inputs)
    assert stock.shape == (1, height, width, 3)
    assert_identical(idle(pipe, inputs), stock)
    with no_run_warnings():
        out = harmonpaint(pipe, inputs)
    assert_harmonpaint_ran(out, stock[0])
