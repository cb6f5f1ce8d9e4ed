"""``attnctl eval``: run recipes over a manifest and score them (resumable, accelerate-aware)."""

from __future__ import annotations

import argparse


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


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command."""
    from harmonpaint_recipe.evaluation.cli_options import add_common_options

    p = subparsers.add_parser(
        "eval", help="inpaint a manifest with recipes and compute CS, CMMD, AS, IR, preservation",
        description="Runs each recipe over the items (reusing outputs already produced), computes metrics and "
        "writes per_item.jsonl, summary.csv, summary.md and grids/. Under `accelerate launch -m attnctl eval` "
        "items are sharded across processes.",
    )
    p.add_argument("--recipes", help="comma list of recipe names or YAML paths, e.g. harmonpaint,sdi")
    p.add_argument("--external", action="append", default=[], metavar="NAME=DIR",
                   help="also score precomputed outputs DIR/<id>.png as method NAME (repeatable)")
    add_common_options(p)
    p.set_defaults(func=_run)
    return p
