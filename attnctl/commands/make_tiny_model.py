"""``attnctl make-tiny-model DIR``: write a tiny random-weight inpainting pipeline folder (SD, SDXL, SD3, FLUX Fill)."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnctl.cli import Command
from attnctl.errors import InputError


_DIT_CLASSES = {"sd3": "StableDiffusion3InpaintPipeline", "flux-fill": "FluxFillPipeline"}


def run(args: argparse.Namespace) -> int:
    from attnctl.testing import save_tiny_dit_pipeline, save_tiny_inpaint_pipeline

    out = Path(args.directory)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise InputError(f"'{out}' exists and is not empty; choose a new folder or pass --force to write into it")
    if args.sdxl and args.dit:
        raise InputError("--sdxl and --dit name two different models; give one of them")
    if args.dit:
        save_tiny_dit_pipeline(out, args.dit, seed=args.seed)
        kind, cls = args.dit.upper(), _DIT_CLASSES[args.dit]
    else:
        kind = "sdxl" if args.sdxl else "sd"
        save_tiny_inpaint_pipeline(out, seed=args.seed, kind=kind)
        kind, cls = kind.upper(), "StableDiffusionXLInpaintPipeline" if args.sdxl else "StableDiffusionInpaintPipeline"
    print(f"wrote a tiny random {kind} inpainting pipeline to {out} (its images are noise: for tests and smoke runs)")
    print(f"load it with {cls}.from_pretrained('{out}') or model.pretrained={out}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="folder to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--sdxl", action="store_true", help="an SDXL-shaped pipeline (70 + 70 sites) instead of SD 1.5's layout")
    p.add_argument("--dit", choices=("sd3", "flux-fill"), default=None,
                   help="a transformer pipeline instead: SD3 inpainting (SD3.5 Medium's layout) or FLUX.1 Fill")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")


COMMAND = Command(help="write a tiny random inpainting pipeline: SD, SDXL, SD3 or FLUX Fill (noise output; for tests "
                  "and offline runs)",
                  add_arguments=add_arguments, run=run)
