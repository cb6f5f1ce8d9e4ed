"""``attnctl sites``: print the site table of a model architecture, built-in model, pipeline folder or hub id."""

from __future__ import annotations

import argparse
from typing import Any

from attnctl.cli import Command
from attnctl.errors import InputError
from attnctl.testing.architectures import UNET_CONFIGS

EXAMPLE = "attnctl sites /path/to/stable-diffusion-inpainting"


def _unet(model: str) -> tuple[Any, int]:
    """The UNet of ``model`` (structure only for an architecture) and the VAE's downsampling factor.

    Built-in names and folders or hub ids load through ``attnctl.models``, as every command's
    models do (the same names, the same offline rule).
    """
    from attnctl.models import load_failure, named_model, pretrained_source
    from attnctl.testing import build_unet

    if model in UNET_CONFIGS:
        return build_unet(model, device="meta"), 8
    make = named_model(model)
    if make is not None:
        pipe = make()
        return pipe.unet, pipe.vae_scale_factor
    from diffusers import AutoencoderKL, UNet2DConditionModel

    source, local_only = pretrained_source(model, example=EXAMPLE)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", use_safetensors=True,
                                                    local_files_only=local_only)
    except (OSError, ValueError) as exc:
        raise load_failure(model, exc, example=EXAMPLE) from None
    try:
        config = AutoencoderKL.load_config(source, subfolder="vae", local_files_only=local_only)
        factor = 2 ** (len(config["block_out_channels"]) - 1)
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
    from attnctl.models import model_names

    p.add_argument("model", help=f"architecture ({', '.join(UNET_CONFIGS)}), built-in model "
                   f"({', '.join(model_names())}), local pipeline folder or hub id")
    p.add_argument("--height", type=int, default=None, help="image height in pixels [the model's own size]")
    p.add_argument("--width", type=int, default=None, help="image width in pixels [the model's own size]")


COMMAND = Command(help="print the attention sites of a model, in execution order", add_arguments=add_arguments,
                  run=run)
