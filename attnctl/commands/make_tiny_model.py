"""``attnctl make-tiny-model DIR``: write a tiny random-weight SD-inpainting pipeline folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnctl.cli import Command
from attnctl.errors import InputError


def run(args: argparse.Namespace) -> int:
    from attnctl.testing import save_tiny_inpaint_pipeline

    out = Path(args.directory)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise InputError(f"'{out}' exists and is not empty; choose a new folder or pass --force to write into it")
    kind = "sdxl" if args.sdxl else "sd"
    save_tiny_inpaint_pipeline(out, seed=args.seed, kind=kind)
    cls = "StableDiffusionXLInpaintPipeline" if args.sdxl else "StableDiffusionInpaintPipeline"
    print(f"wrote a tiny random {kind.upper()} inpainting pipeline to {out} (its images are noise: for tests and smoke runs)")
    print(f"load it with {cls}.from_pretrained('{out}') or model.pretrained={out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="folder to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--sdxl", action="store_true", help="an SDXL-shaped pipeline (70 + 70 sites) instead of SD 1.5's layout")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")


COMMAND = Command(help="write a tiny random SD-inpainting pipeline (noise output; for tests and offline runs)",
                  add_arguments=add_arguments, run=run)
