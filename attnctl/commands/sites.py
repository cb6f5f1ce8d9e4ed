"""``attnctl sites``: print the site table of a model architecture or pipeline folder."""

from __future__ import annotations

import argparse

from attnctl.cli import Command
from attnctl.errors import InputError
from attnctl.testing.architectures import UNET_CONFIGS


def run(args: argparse.Namespace) -> int:
    from attnctl.sites import describe_sites
    from attnctl.testing import build_unet

    if args.model in UNET_CONFIGS:
        unet = build_unet(args.model, device="meta")
    else:
        from diffusers import UNet2DConditionModel

        try:
            unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet", use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise InputError(
                f"cannot load a UNet from '{args.model}' ({exc.__class__.__name__}); pass one of "
                f"{', '.join(UNET_CONFIGS)} or a local pipeline folder with a unet/ subfolder"
            ) from None
    latent = (args.height // 8, args.width // 8)
    print(f"# {args.model}: sites at {args.height}x{args.width} (latent {latent[0]}x{latent[1]})")
    print(describe_sites(unet).format(latent))
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=f"architecture ({', '.join(UNET_CONFIGS)}) or a local pipeline folder")
    p.add_argument("--height", type=int, default=512, help="image height in pixels (default 512)")
    p.add_argument("--width", type=int, default=512, help="image width in pixels (default 512)")


COMMAND = Command(help="print the attention sites of a model, in execution order", add_arguments=add_arguments,
                  run=run)
