"""The ``attnctl`` command line.

Each sub-command lives in its own module that exposes ``add_parser(subparsers)``;
the parser it adds sets ``func`` to a callable taking the parsed ``argparse.Namespace``
and returning an exit code. Commands that drive recipes live in ``harmonpaint_recipe``
and are imported lazily, so ``attnctl strategies`` works without loading diffusers
pipelines.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from attnctl.errors import AttnctlError

# module path of every sub-command, in the order ``attnctl --help`` lists them
COMMAND_MODULES: tuple[str, ...] = (
    "attnctl.commands.strategies",
    "attnctl.commands.sites",
    "attnctl.commands.make_tiny_model",
    "harmonpaint_recipe.commands.recipes",
    "harmonpaint_recipe.commands.inpaint",
    "harmonpaint_recipe.commands.bench",
    "harmonpaint_recipe.commands.evaluate",
    "harmonpaint_recipe.commands.ablate",
    "harmonpaint_recipe.commands.dataset",
    "harmonpaint_recipe.commands.testbed",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every sub-command that can be imported."""
    parser = argparse.ArgumentParser(
        prog="attnctl",
        description="Attention control for diffusers pipelines (HarmonPaint and friends).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # a command whose module is not part of this install is simply not offered
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnctl`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AttnctlError as exc:
        print(f"attnctl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
