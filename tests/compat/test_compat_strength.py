"""``strength < 1`` (img2img-style inpainting): the run starts at a lower t, so HarmonPaint's
structure phase (gated to t/T >= eta = 0.6) cannot act; attnctl says so with a RunWarning."""

from __future__ import annotations

import re
import warnings

import pytest

import attnctl
from compat_helpers import assert_effect_kept, assert_harmonpaint_ran, assert_identical, harmonpaint, idle, plain

# 5 DDIM steps are t = 801, 601, 401, 201, 1; strength 0.6 keeps the last 3 (t/T <= 0.401)
STEPS = 5


def test_strength_below_the_phase_boundary(pipe, inputs):
    stock = plain(pipe, inputs, steps=STEPS, strength=0.6)
    assert_identical(idle(pipe, inputs, steps=STEPS, strength=0.6), stock)

    with pytest.warns(attnctl.RunWarning) as record:
        out = harmonpaint(pipe, inputs, f"sampler.steps={STEPS}", "sampler.strength=0.6")
    messages = [str(w.message) for w in record if issubclass(w.category, attnctl.RunWarning)]
    silenced = sorted(re.match(r"strategies\.(\w+) will not act in this run", m).group(1) for m in messages)
    assert silenced == ["sams", "steer"]  # MAKVS (t/T < 0.6) still acts
    assert all("0.6 <= t/T" in m and "from 0.401 down to 0.001" in m for m in messages)
    assert_harmonpaint_ran(out, stock[0])  # MAKVS alone

    # (c) strength keeps its effect: the same recipe at strength 1 is another image
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnctl.RunWarning)  # every strategy can act at strength 1
        full = harmonpaint(pipe, inputs, f"sampler.steps={STEPS}")
    assert_effect_kept(out, full, stock[0], plain(pipe, inputs, steps=STEPS)[0])


def test_strength_above_the_phase_boundary_warns_nothing(pipe, inputs):
    """strength 0.9 keeps 4 of the 5 steps (t = 601 .. 1): both phases have steps, nobody is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnctl.RunWarning)
        out = harmonpaint(pipe, inputs, f"sampler.steps={STEPS}", "sampler.strength=0.9")
    assert out.shape == (64, 64, 3)
