"""Full-size denoiser configs of the supported models, shipped with the package.

They let the site tables and benchmarks be built without downloading anything:
``build_unet("sd15-inpaint", device="meta")`` builds SD 1.5's inpainting UNet structure with no
memory, ``build_transformer("sd35-medium", device="meta")`` the transformer of a DiT model
(SD3 / SD3.5 / FLUX.1). The values are those of each model's published ``config.json``.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from attnctl.errors import ConfigError, did_you_mean

#: architecture name -> UNet config file in ``attnctl/testing/configs``
UNET_CONFIGS = {
    "sd15-inpaint": "sd15-inpaint-unet.json",
    "sd2-inpaint": "sd2-inpaint-unet.json",
    "sdxl-inpaint": "sdxl-inpaint-unet.json",
}
#: architecture name -> DiT transformer config file in ``attnctl/testing/configs`` (its
#: ``_class_name`` names the diffusers class)
DIT_CONFIGS = {
    "sd3-medium": "sd3-medium-transformer.json",
    "sd35-medium": "sd35-medium-transformer.json",
    "sd35-large": "sd35-large-transformer.json",
    "flux1-dev": "flux1-dev-transformer.json",
    "flux1-fill-dev": "flux1-fill-dev-transformer.json",
}


def _read_config(arch: str, table: dict[str, str]) -> dict[str, Any]:
    """The shipped config file of ``arch`` as written, ``_`` keys included."""
    if arch not in table:
        raise ConfigError(f"unknown architecture '{arch}'{did_you_mean(arch, table)}; known: {', '.join(table)}")
    text = resources.files("attnctl.testing.configs").joinpath(table[arch]).read_text(encoding="utf-8")
    return json.loads(text)


def _model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    # `_class_name`, `_source` and the like describe the file, not the model
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_unet_config(arch: str) -> dict[str, Any]:
    """The diffusers UNet config of ``arch`` (keys starting with ``_`` removed)."""
    return _model_kwargs(_read_config(arch, UNET_CONFIGS))


def load_transformer_config(arch: str) -> dict[str, Any]:
    """The diffusers transformer config of DiT architecture ``arch`` (keys starting with ``_`` removed)."""
    return _model_kwargs(_read_config(arch, DIT_CONFIGS))


def build_unet(arch: str, device: Any = "meta", dtype: Any = None):
    """Build the UNet of ``arch`` with random weights (on ``meta``: structure only; ``dtype`` default fp32)."""
    import torch
    from diffusers import UNet2DConditionModel

    dtype = dtype or torch.float32
    with torch.device(device):
        unet = UNet2DConditionModel(**load_unet_config(arch))
    return unet if dtype == torch.float32 else unet.to(dtype)


def build_transformer(arch: str, device: Any = "meta", dtype: Any = None) -> Any:
    """Build the transformer of DiT architecture ``arch`` (``SD3Transformer2DModel`` or
    ``FluxTransformer2DModel``) with random weights; on ``meta`` the structure only, with no memory."""
    import diffusers
    import torch

    config = _read_config(arch, DIT_CONFIGS)
    dtype = dtype or torch.float32
    with torch.device(device):
        transformer = getattr(diffusers, config["_class_name"])(**_model_kwargs(config))
    return transformer if dtype == torch.float32 else transformer.to(dtype)
