"""``attnctl sites``: print the site table of a model architecture, built-in model, pipeline folder or hub id.

UNets and diffusion transformers (SD3, FLUX; ``attnctl.backbones``) alike: a transformer's
table lists its joint, single and self sites in execution order with the blocks each holds.
"""

from __future__ import annotations

import argparse
from typing import Any

from attnctl.cli import Command
from attnctl.errors import InputError
from attnctl.testing.architectures import DIT_CONFIGS, UNET_CONFIGS

EXAMPLE = "attnctl sites /path/to/stable-diffusion-inpainting"


def _denoiser(model: str) -> tuple[Any, int]:
    """The UNet or transformer of ``model`` (structure only for an architecture) and the VAE's factor.

    Built-in names and folders or hub ids load through ``attnctl.models``, as every command's
    models do (the same names, the same offline rule).
    """
    from attnctl.backbones import denoiser_of
    from attnctl.models import load_failure, named_model, pretrained_source
    from attnctl.testing import build_transformer, build_unet

    if model in UNET_CONFIGS:
        return build_unet(model, device="meta"), 8
    if model in DIT_CONFIGS:
        return build_transformer(model, device="meta"), 8
    make = named_model(model)
    if make is not None:
        pipe = make()
        return denoiser_of(pipe), pipe.vae_scale_factor
    from diffusers import AutoencoderKL

    source, local_only = pretrained_source(model, example=EXAMPLE)
    try:
        unet = _load_denoiser(source, local_only)
    except (OSError, ValueError) as exc:
        raise load_failure(model, exc, example=EXAMPLE) from None
    try:
        config = AutoencoderKL.load_config(source, subfolder="vae", local_files_only=local_only)
        factor = 2 ** (len(config["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError):
        factor = 8
    return unet, factor


def _load_denoiser(source: str, local_only: bool) -> Any:
    """A pipeline folder's (or hub id's) UNet, or its transformer when it has no UNet."""
    import diffusers

    try:
        return diffusers.UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True,
                                                              local_files_only=local_only)
    except OSError:
        config = diffusers.DiffusionPipeline.load_config(source, local_files_only=local_only)
        kind = config.get("transformer", [None, None])[1]
        if kind is None or not hasattr(diffusers, kind):
            raise
        return getattr(diffusers, kind).from_pretrained(source, subfolder="transformer", use_safetensors=True,
                                                        local_files_only=local_only)


def _native_size(model: Any, factor: int) -> int:
    """The image side the model was trained at: its sample size in latent pixels (FLUX: 128, 1024 px)."""
    size = getattr(model.config, "sample_size", None) or 128
    return int(size) * factor


def run(args: argparse.Namespace) -> int:
    from attnctl.backbones import find_backbone

    unet, factor = _denoiser(args.model)
    backbone = find_backbone(unet)
    native = _native_size(unet, factor)
    height, width = args.height or native, args.width or native
    if height % factor or width % factor:
        raise InputError(f"--height/--width must be multiples of {factor} (the VAE's factor), got {height}x{width}")
    latent = (height // factor, width // factor)
    family = f", {backbone.name} transformer" if backbone.is_transformer else ""
    print(f"# {args.model}: sites at {height}x{width} (latent {latent[0]}x{latent[1]}{family})")
    print(backbone.describe_sites(unet).format(latent))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    from attnctl.models import model_names

    p.add_argument("model", help=f"architecture ({', '.join([*UNET_CONFIGS, *DIT_CONFIGS])}), built-in model "
                   f"({', '.join(model_names())}), local pipeline folder or hub id")
    p.add_argument("--height", type=int, default=None, help="image height in pixels [the model's own size]")
    p.add_argument("--width", type=int, default=None, help="image width in pixels [the model's own size]")


COMMAND = Command(help="print the attention sites of a model, in execution order", add_arguments=add_arguments,
                  run=run)
