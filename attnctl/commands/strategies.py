"""``attnctl strategies``: list discovered strategies with their parameters and defaults."""

from __future__ import annotations

import argparse

from attnctl.cli import Command


def run(args: argparse.Namespace) -> int:
    from attnctl.plugins import StrategyManager

    manager = StrategyManager.default()
    specs = manager.strategies()
    if not specs:
        print("no strategies found (is attnctl installed? `pip install -e .`)")
        return 1
    for name, spec in specs.items():
        print(f"{name}  [plugin: {manager.provider(name)}]")
        print(f"    {spec.summary}")
        for pname, ptype, default, help_text in spec.parameter_table():
            print(f"    {pname}: {ptype} = {default!r}" + (f"  -- {help_text}" if help_text else ""))
        print()
    return 0


COMMAND = Command(help="list strategies with their parameters and defaults", run=run)
