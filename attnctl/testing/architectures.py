"""Full-size UNet configs of the supported inpainting models, shipped with the package.

They let the site tables and benchmarks be built without downloading anything
(``build_unet("sd15-inpaint", device="meta")`` builds the structure with no memory).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from attnctl.errors import ConfigError, did_you_mean

#: architecture name -> config file in ``attnctl/testing/configs``
UNET_CONFIGS = {
    "sd15-inpaint": "sd15-inpaint-unet.json",
    "sd2-inpaint": "sd2-inpaint-unet.json",
    "sdxl-inpaint": "sdxl-inpaint-unet.json",
}


def load_unet_config(arch: str) -> dict[str, Any]:
    """The diffusers UNet config of ``arch`` (keys starting with ``_`` removed)."""
    if arch not in UNET_CONFIGS:
        raise ConfigError(f"unknown architecture '{arch}'{did_you_mean(arch, UNET_CONFIGS)}; known: {', '.join(UNET_CONFIGS)}")
    text = resources.files("attnctl.testing.configs").joinpath(UNET_CONFIGS[arch]).read_text(encoding="utf-8")
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def build_unet(arch: str, device: Any = "meta", dtype: Any = None):
    """Build the UNet of ``arch`` with random weights (on ``meta``: structure only; ``dtype`` default fp32)."""
    import torch
    from diffusers import UNet2DConditionModel

    dtype = dtype or torch.float32
    with torch.device(device):
        unet = UNet2DConditionModel(**load_unet_config(arch))
    return unet if dtype == torch.float32 else unet.to(dtype)
