"""``attnctl ablate``: Table III variants of a recipe (none, cumulative, full, leave-one-out)."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.evaluation.ablation import ablation_methods
    from harmonpaint_recipe.evaluation.cli_options import check_overrides, run_from_args

    methods = ablation_methods(args.recipe, check_overrides(args.overrides))
    return run_from_args(args, methods, f"Ablation of {args.recipe}")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``ablate`` sub-command."""
    from harmonpaint_recipe.evaluation.cli_options import add_common_options

    p = subparsers.add_parser(
        "ablate", help="evaluate the ablation variants of a recipe's strategies (Table III)",
        description="Derives variants from the recipe's strategies (gates such as timestep_gate are not "
        "components): none, +first, +first+second, ..., full, and each leave-one-out; then evaluates them "
        "like `attnctl eval`.",
    )
    p.add_argument("--recipe", required=True, help="recipe name or YAML path, e.g. harmonpaint")
    add_common_options(p)
    p.set_defaults(func=_run)
    return p
