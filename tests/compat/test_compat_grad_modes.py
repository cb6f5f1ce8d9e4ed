"""Calling the pipeline under ``torch.no_grad()`` or ``torch.inference_mode()`` (common in
serving code). Latent guidance needs gradients inside the call; it turns them on itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnctl
from compat_helpers import assert_same, harmonpaint


def test_no_grad_around_the_call(pipe, inputs):
    reference = harmonpaint(pipe, inputs)
    with torch.no_grad():
        assert np.array_equal(harmonpaint(pipe, inputs), reference)


def test_inference_mode_does_not_silently_drop_latent_guidance(pipe, inputs):
    """Either the same image as outside inference mode, or an attnctl error that says why."""
    reference = harmonpaint(pipe, inputs)
    try:
        with torch.inference_mode():
            out = harmonpaint(pipe, inputs)
    except attnctl.AttnctlError as error:
        assert "inference_mode" in str(error)
        return
    assert_same(out, reference)
