"""``attnctl eval``: run recipes over a manifest and score them (resumable, accelerate-aware)."""

from __future__ import annotations

import argparse

from attnctl.cli import Command


def _run(args: argparse.Namespace) -> int:
    from attnctl.errors import InputError
    from harmonpaint_recipe.evaluation.cli_options import check_overrides, run_from_args
    from harmonpaint_recipe.evaluation.methods import Method, parse_external

    overrides = tuple(check_overrides(args.overrides))
    recipes = [r.strip() for r in (args.recipes or "").split(",") if r.strip()]
    methods = [Method(name=r, recipe=r, overrides=overrides) for r in recipes]
    methods += [parse_external(spec) for spec in args.external]
    if not methods:
        raise InputError("nothing to evaluate: give --recipes harmonpaint,sdi,... and/or --external NAME=DIR")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise InputError(f"method names must be unique, got {', '.join(names)}")
    return run_from_args(args, methods, "Evaluation")


def _arguments(parser: argparse.ArgumentParser) -> None:
    from harmonpaint_recipe.evaluation.cli_options import add_common_options

    parser.add_argument("--recipes", help="comma list of recipe names or YAML paths, e.g. harmonpaint,sdi")
    parser.add_argument("--external", action="append", default=[], metavar="NAME=DIR",
                        help="also score precomputed outputs DIR/<id>.png as method NAME (repeatable)")
    add_common_options(parser)


COMMAND = Command(
    help="inpaint a manifest with recipes and compute CS, CMMD, AS, IR, preservation",
    description="Runs each recipe over the items (reusing outputs already produced), computes metrics and "
    "writes per_item.jsonl, summary.csv, summary.md and grids/. Under `accelerate launch -m attnctl eval` "
    "items are sharded across processes.",
    add_arguments=_arguments,
    run=_run,
)
