"""``attnctl make-tiny-model DIR``: write a tiny random-weight SD-inpainting pipeline folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnctl.errors import InputError


def run(args: argparse.Namespace) -> int:
    from attnctl.tiny import save_tiny_inpaint_pipeline

    out = Path(args.directory)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise InputError(f"'{out}' exists and is not empty; choose a new folder or pass --force to write into it")
    save_tiny_inpaint_pipeline(out, seed=args.seed)
    print(f"wrote a tiny random inpainting pipeline to {out} (its images are noise: for tests and smoke runs)")
    print(f"load it with StableDiffusionInpaintPipeline.from_pretrained('{out}') or model.pretrained={out}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "make-tiny-model", help="write a tiny random SD-inpainting pipeline (noise output; for tests and offline runs)"
    )
    p.add_argument("directory", help="folder to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=run)
