"""``attnctl recipes`` and ``attnctl recipe show NAME [key=value ...]``."""

from __future__ import annotations

import argparse


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


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``recipes`` (list) and ``recipe show`` (print one, resolved)."""
    listing = subparsers.add_parser("recipes", help="list the shipped recipes")
    listing.set_defaults(func=_list)

    recipe = subparsers.add_parser("recipe", help="inspect a recipe")
    actions = recipe.add_subparsers(dest="recipe_command", metavar="ACTION", required=True)
    show = actions.add_parser("show", help="print a recipe as fully resolved YAML (after overrides)")
    show.add_argument("name", help="shipped recipe name or path of a YAML file")
    show.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. strategies.makvs.scale=0.8")
    show.set_defaults(func=_show)
    return listing
