"""Fixtures of the compatibility suite (the tiny pipeline itself comes from tests/conftest.py)."""

from __future__ import annotations

import pytest

from compat_helpers import Inputs, make_inputs, write_tiny_ip_adapter


@pytest.fixture
def pipe(tiny_pipe):
    """A freshly loaded tiny SD inpainting pipeline (DDIM, CPU, fp32)."""
    return tiny_pipe


@pytest.fixture(scope="session")
def inputs() -> Inputs:
    """A 64x64 random image and a mask over its middle half."""
    return make_inputs(64, 64)


@pytest.fixture(scope="session")
def ip_adapter_weights(tmp_path_factory, tiny_pipe_dir):
    """A tiny random IP-Adapter for the tiny UNet, as a safetensors file."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_pipe_dir), subfolder="unet")
    return write_tiny_ip_adapter(unet, tmp_path_factory.mktemp("ip-adapter"))
