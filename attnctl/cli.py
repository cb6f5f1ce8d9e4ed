"""The ``attnctl`` command line.

Sub-commands are discovered the way strategies are: every entry point of the group
``attnctl.commands`` names a ``Command`` (``"package.module:COMMAND"``). attnctl registers its
own (``strategies``, ``sites``, ``make-tiny-model``), the application and third parties
theirs; this module knows none of them by name.

Only the command that runs is imported (``attnctl --help`` imports the command modules for
their one-line help, which is why a command module imports nothing heavy at its top), and
options and ``key=value`` overrides may be mixed in any order.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Mapping, Sequence

from attnctl.errors import AttnctlError, did_you_mean
from attnctl.notices import print_line, quiet_library_notices, warnings_as_lines

ENTRY_POINT_GROUP = "attnctl.commands"


@dataclass(frozen=True)
class Command:
    """One ``attnctl`` sub-command.

    Attributes:
        help: one line, shown by ``attnctl --help`` and as the command's description.
        add_arguments: adds the command's options and positionals to its parser.
        run: runs the command with the parsed arguments; returns the exit code.
        actions: sub-actions (``attnctl recipe show``), each a ``Command`` of its own; a
            command with actions has no arguments or run of its own.
        description: a longer text for ``attnctl COMMAND --help`` (default: ``help``).
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    run: Callable[[argparse.Namespace], int] | None = None
    actions: Mapping[str, Command] = field(default_factory=dict)
    description: str = ""


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep)
    return found


def _load(ep: metadata.EntryPoint) -> Command | None:
    """The command of ``ep``, or None (with a one-line notice) when its package is broken."""
    try:
        command = ep.load()
    except Exception as exc:  # a broken third-party command must not take the others down
        dist = f" (package {ep.dist.name})" if ep.dist is not None else ""
        print(f"attnctl: command '{ep.name}'{dist} could not be loaded: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    if not isinstance(command, Command):
        print(f"attnctl: entry point '{ep.name}' = {ep.value} is not an attnctl.cli.Command; skipped", file=sys.stderr)
        return None
    return command


def _overview() -> str:
    lines = ["usage: attnctl COMMAND [options] [key=value ...]", "",
             "Attention control for diffusers pipelines (HarmonPaint and friends).", "", "commands:"]
    commands = {name: _load(ep) for name, ep in _entry_points().items()}
    width = max((len(n) for n in commands), default=0)
    for name, command in commands.items():
        if command is not None:
            lines.append(f"  {name:<{width}}  {command.help}")
    lines += ["", "`attnctl COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def _parser(prog: str, command: Command) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=command.description or command.help)
    command.add_arguments(parser)
    return parser


def _actions_help(prog: str, command: Command) -> str:
    width = max(len(a) for a in command.actions)
    rows = [f"  {name:<{width}}  {action.help}" for name, action in command.actions.items()]
    return "\n".join([f"usage: {prog} ACTION ...", "", command.help, "", "actions:", *rows])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnctl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_overview())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"attnctl {metadata.version('attnctl')}")
        return 0
    name, rest = argv[0], argv[1:]
    entry_points = _entry_points()
    if name not in entry_points:
        print(f"attnctl: unknown command '{name}'{did_you_mean(name, entry_points)}; see `attnctl --help`",
              file=sys.stderr)
        return 2
    command = _load(entry_points[name])
    if command is None:
        return 2
    prog = f"attnctl {name}"
    if command.actions:
        if not rest or rest[0] in ("-h", "--help"):
            print(_actions_help(prog, command))
            return 0 if rest else 2
        if rest[0] not in command.actions:
            print(f"{prog}: unknown action '{rest[0]}'{did_you_mean(rest[0], command.actions)}; "
                  f"choose from {', '.join(command.actions)}", file=sys.stderr)
            return 2
        prog, command, rest = f"{prog} {rest[0]}", command.actions[rest[0]], rest[1:]
    args = _parser(prog, command).parse_intermixed_args(rest)
    args.command = name
    quiet_library_notices()
    try:
        with warnings_as_lines(prog):
            return int(command.run(args) or 0)
    except AttnctlError as exc:
        print_line(f"{prog}: error: {exc}")
        return 2
    except OSError as exc:  # a path the user gave cannot be read or written
        where = f" '{exc.filename}'" if exc.filename else ""
        print_line(f"{prog}: error: {exc.strerror or exc}{where}; check the path and its permissions")
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
