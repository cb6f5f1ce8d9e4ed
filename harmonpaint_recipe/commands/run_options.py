"""What every command that runs a recipe on one image asks for (``inpaint``, ``probe``).

The recipe, image, mask, prompt, seed, device, dtype, threads, mask resizing and
``key=value`` overrides: one set of options, one way of turning them into recipe overrides
(warnings print as one line through the command line itself). Nothing heavy is imported
here (command modules are imported for ``attnctl --help``).
"""

from __future__ import annotations

import argparse

from attnctl.errors import InputError


def add_run_inputs(parser: argparse.ArgumentParser, recipe_default: str | None = "harmonpaint") -> None:
    """The options of one recipe run on one image (see the module docstring)."""
    shown = f" [{recipe_default}]" if recipe_default else ""
    parser.add_argument("--recipe", default=recipe_default, help=f"shipped recipe name or YAML path{shown}")
    parser.add_argument("--image", help="input image (sides multiples of 8)")
    parser.add_argument("--mask", help="mask image, white = region to inpaint (binarized at 0.5)")
    parser.add_argument("--prompt", help="text prompt for the inpainted region")
    parser.add_argument("--seed", type=int, default=None, help="noise seed [random, recorded in the sidecar]")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="overrides model.device")
    parser.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), help="overrides model.dtype")
    parser.add_argument("--threads", default="auto",
                        help="CPU threads [auto: OMP_NUM_THREADS if set, 1 for the tiny models, else torch's "
                        "default; inpaint --from: the count the sidecar recorded]")
    parser.add_argument("--resize-mask", action="store_true", help="resize a mask of another size to the image (nearest)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. strategies.makvs.enabled=false")


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The ``key=value`` overrides, plus ``--device`` / ``--dtype`` as ``model.*`` overrides."""
    out = list(args.overrides)
    bad = [o for o in out if "=" not in o]
    if bad:
        raise InputError(
            f"unexpected argument '{bad[0]}': overrides are key=value (e.g. sampler.steps=20); "
            "quote prompts with spaces: --prompt \"a red car\""
        )
    if args.device:
        out.append(f"model.device={args.device}")
    if args.dtype:
        out.append(f"model.dtype={args.dtype}")
    return out
