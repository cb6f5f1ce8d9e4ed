"""``attnctl sites``: print the site table of a model architecture or pipeline folder."""

from __future__ import annotations

import argparse
from typing import Any

from attnctl.cli import Command
from attnctl.errors import InputError
from attnctl.testing.architectures import UNET_CONFIGS

TINY = ("tiny", "tiny-sdxl")
MODELS = (*UNET_CONFIGS, *TINY)


def _unet(model: str) -> tuple[Any, int]:
    """The UNet of ``model`` (structure only where possible) and the VAE's downsampling factor."""
    from attnctl.testing import build_tiny_inpaint_pipeline, build_unet

    if model in UNET_CONFIGS:
        return build_unet(model, device="meta"), 8
    if model in TINY:
        pipe = build_tiny_inpaint_pipeline(kind="sdxl" if model == "tiny-sdxl" else "sd")
        return pipe.unet, pipe.vae_scale_factor
    from diffusers import AutoencoderKL, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"cannot load a UNet from '{model}' ({exc.__class__.__name__}); pass one of "
            f"{', '.join(MODELS)} or a local pipeline folder with a unet/ subfolder"
        ) from None
    try:
        factor = 2 ** (len(AutoencoderKL.load_config(model, subfolder="vae")["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError):
        factor = 8
    return unet, factor


def run(args: argparse.Namespace) -> int:
    from attnctl.sites import describe_sites

    unet, factor = _unet(args.model)
    native = int(unet.config.sample_size) * factor  # the size the model was trained at
    height, width = args.height or native, args.width or native
    if height % factor or width % factor:
        raise InputError(f"--height/--width must be multiples of {factor} (the VAE's factor), got {height}x{width}")
    latent = (height // factor, width // factor)
    print(f"# {args.model}: sites at {height}x{width} (latent {latent[0]}x{latent[1]})")
    print(describe_sites(unet).format(latent))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"architecture ({', '.join(MODELS)}) or a local pipeline folder")
    p.add_argument("--height", type=int, default=None, help="image height in pixels [the model's own size]")
    p.add_argument("--width", type=int, default=None, help="image width in pixels [the model's own size]")


COMMAND = Command(help="print the attention sites of a model, in execution order", add_arguments=add_arguments,
                  run=run)
