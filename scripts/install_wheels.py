#!/usr/bin/env python3
"""Install carried wheels into a folder for PYTHONPATH, without network access.

usage: python scripts/install_wheels.py WHEEL_DIR TARGET_DIR

A wheel is installed when its distribution is missing on this machine, or when the
machine's version does not satisfy a requirement of what ``attnctl`` (and ``pytest``)
need; a distribution the machine already has in a fitting version is left alone, so the
machine's own torch stack is never shadowed. Installation is
``pip install --no-index --no-deps --target TARGET_DIR`` (or, without pip, the wheels are
unpacked there, which is what ``--target`` does for pure-Python and binary wheels alike).
Afterwards every requirement reachable from the roots is checked against what Python
will see with ``PYTHONPATH=TARGET_DIR`` and anything unsatisfied is listed.

Stand-alone on purpose: it runs before attnctl is importable.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]

USAGE = "usage: python scripts/install_wheels.py WHEEL_DIR TARGET_DIR"
ROOTS = ("attnctl", "pytest", "matplotlib", "psutil")


def normalize(name: str) -> str:
    """PEP 503 name: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Dist:
    """A distribution, installed or in a wheel: name, version, requirement strings."""

    name: str
    version: str
    requires: list[str] = field(default_factory=list)
    wheel: Path | None = None


def wheel_dist(path: Path) -> Dist:
    """Name, version and requirements of a ``.whl`` file (from its METADATA)."""
    with zipfile.ZipFile(path) as zf:
        meta_name = next((n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if meta_name is None:
            raise SystemExit(f"install_wheels: {path} has no .dist-info/METADATA: not a wheel")
        meta = Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    return Dist(normalize(meta["Name"]), meta["Version"], meta.get_all("Requires-Dist") or [], path)


def machine_dists(exclude: Path) -> dict[str, Dist]:
    """The distributions this interpreter sees (first on the path wins), outside ``exclude``."""
    path = [p for p in sys.path if p and Path(p).resolve() != exclude.resolve()]
    found: dict[str, Dist] = {}
    for d in md.distributions(path=path):
        name = d.metadata["Name"]
        if name and normalize(name) not in found:
            found[normalize(name)] = Dist(normalize(name), d.version, d.requires or [])
    return found


def _active(req: Requirement) -> bool:
    return req.marker is None or req.marker.evaluate({"extra": ""})


def unsatisfied(view: dict[str, Dist], roots=ROOTS) -> list[tuple[str, str, str | None]]:
    """(who, requirement, version found or None) for every requirement reachable from
    ``roots`` that ``view`` does not satisfy."""
    problems, seen, todo = [], set(), [normalize(r) for r in roots if normalize(r) in view]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        dist = view[name]
        for text in dist.requires:
            req = Requirement(text)
            if not _active(req):
                continue
            dep = view.get(normalize(req.name))
            if dep is None or not req.specifier.contains(dep.version, prereleases=True):
                problems.append((f"{dist.name} {dist.version}", str(req), dep.version if dep else None))
            if dep is not None:
                todo.append(dep.name)
    return problems


def plan(wheels: dict[str, Dist], machine: dict[str, Dist]) -> dict[str, Dist]:
    """The wheels to install: every one the machine lacks, then, until nothing changes, each
    carried wheel that fixes a requirement the current view does not satisfy."""
    chosen = {n: w for n, w in wheels.items() if n not in machine}
    while True:
        view = {**machine, **chosen}
        added = False
        for _, text, _ in unsatisfied(view):
            req = Requirement(text)
            name = normalize(req.name)
            wheel = wheels.get(name)
            if wheel and name not in chosen and req.specifier.contains(wheel.version, prereleases=True):
                chosen[name] = wheel
                added = True
        if not added:
            return chosen


def _has_pip() -> bool:
    return subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0


def install(dists: list[Dist], target: Path) -> None:
    """``pip install --no-index --no-deps --target`` (unpack the wheels where pip is missing)."""
    target.mkdir(parents=True, exist_ok=True)
    paths = [str(d.wheel) for d in dists]
    if _has_pip():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                        "--upgrade", "--target", str(target), *paths], check=True)
        return
    for p in paths:
        with zipfile.ZipFile(p) as zf:
            zf.extractall(target)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    wheel_dir, target = Path(argv[0]), Path(argv[1])
    files = sorted(wheel_dir.glob("*.whl"))
    if not files:
        print(f"install_wheels: no .whl files in '{wheel_dir}'; make them with scripts/gpu-wheels.sh {wheel_dir}",
              file=sys.stderr)
        return 2
    wheels = {d.name: d for d in map(wheel_dist, files)}
    machine = machine_dists(target)
    chosen = plan(wheels, machine)
    for name, w in sorted(wheels.items()):
        have = machine.get(name)
        if name not in chosen:
            state = f"not needed, the machine has {have.version}" if have else "not needed"
        else:
            state = f"installing over the machine's {have.version}" if have else "installing"
        print(f"  {w.name} {w.version}: {state}")
    install(list(chosen.values()), target)
    view = {**machine, **{n: Dist(n, w.version, w.requires) for n, w in chosen.items()}}
    problems = unsatisfied(view)
    for who, req, found in problems:
        print(f"install_wheels: warning: {who} needs {req}, found {found or 'nothing'}", file=sys.stderr)
    print(f"install_wheels: {len(chosen)} of {len(wheels)} wheels installed into {target}"
          + (f"; {len(problems)} requirement(s) unsatisfied (see above)" if problems else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
