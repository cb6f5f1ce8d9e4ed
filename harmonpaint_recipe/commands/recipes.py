"""``attnctl recipes`` and ``attnctl recipe show NAME [key=value ...]``."""

from __future__ import annotations

import argparse

from attnctl.cli import Command


def _list(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.loading import describe, recipe_names

    names = recipe_names()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {describe(name)}")
    print("\nshow one fully resolved: attnctl recipe show NAME [key=value ...]")
    return 0


def _show(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.loading import load_recipe, to_yaml

    print(to_yaml(load_recipe(args.name, args.overrides)), end="")
    return 0


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="shipped recipe name or path of a YAML file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. strategies.makvs.scale=0.8")


RECIPES = Command(help="list the shipped recipes", run=_list)
RECIPE = Command(
    help="inspect a recipe",
    actions={"show": Command(help="print a recipe as fully resolved YAML (after overrides)",
                             add_arguments=_show_arguments, run=_show)},
)
