"""``attnctl ablate``: Table III variants of a recipe (none, cumulative, full, leave-one-out)."""

from __future__ import annotations

import argparse

from attnctl.cli import Command


def _run(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.evaluation.ablation import ablation_methods
    from harmonpaint_recipe.evaluation.cli_options import check_overrides, run_from_args

    methods = ablation_methods(args.recipe, check_overrides(args.overrides))
    return run_from_args(args, methods, f"Ablation of {args.recipe}")


def _arguments(parser: argparse.ArgumentParser) -> None:
    from harmonpaint_recipe.evaluation.cli_options import add_common_options

    parser.add_argument("--recipe", required=True, help="recipe name or YAML path, e.g. harmonpaint")
    add_common_options(parser)


COMMAND = Command(
    help="evaluate the ablation variants of a recipe's strategies (Table III)",
    description="Derives variants from the recipe's strategies (gates such as timestep_gate are not "
    "components): none, +first, +first+second, ..., full, and each leave-one-out; then evaluates them "
    "like `attnctl eval`.",
    add_arguments=_arguments,
    run=_run,
)
