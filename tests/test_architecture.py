"""The package rule of docs/architecture.md, checked by reading every import.

``attnctl`` (the engine) imports nothing from ``strategies`` or ``harmonpaint_recipe``, not
even through a string handed to ``importlib``; ``strategies`` imports only ``attnctl`` of
the project's packages; and the files of ``attnctl/`` import each other without circles,
``TYPE_CHECKING`` and function-level imports included.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attnctl", "strategies", "harmonpaint_recipe")
# a dotted module path (optionally with an entry point's ":attr") inside a project package
_MODULE_STRING = re.compile(r"^(attnctl|strategies|harmonpaint_recipe)(\.[A-Za-z_][\w.]*)(:[\w.]+)?$")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, strings: bool = True) -> set[str]:
    """The project modules the file at ``path`` names (see ``names_in``)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    return names_in(path.read_text(encoding="utf-8"), package, strings)


def names_in(source: str, package: str, strings: bool = True) -> set[str]:
    """Every project module ``source`` names: import statements anywhere (type-checking and
    function-level ones too), ``importlib.import_module("...")`` / ``__import__("...")`` calls, and
    with ``strings``, any other string that spells a dotted project module path (e.g. an entry
    point's ``"package.module:attr"``)."""
    tree = ast.parse(source)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # 'from a.b import c' names a.b.c (a module) or a.b (when c is a name in it)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and _is_import_call(node.func) and node.args:
            if isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
        elif strings and isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.match(node.value):
            found.add(node.value.split(":")[0])
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _is_import_call(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in ("import_module", "__import__")


def project_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package,forbidden", [
    ("attnctl", ("strategies", "harmonpaint_recipe")),
    ("strategies", ("harmonpaint_recipe",)),
])
def test_lower_packages_never_name_upper_ones(package, forbidden):
    offenders = [
        f"{path.relative_to(ROOT)} -> {name}"
        for path in project_files(package)
        for name in imported_modules(path)
        if name.split(".")[0] in forbidden
    ]
    assert not offenders, "imports against the package rule:\n" + "\n".join(offenders)


def _engine_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in project_files("attnctl")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for imported in imported_modules(path, strings=False):
            # 'from attnctl.x import y' names attnctl.x (or the module attnctl.x.y when it is one)
            while imported and imported not in files:
                imported = imported.rsplit(".", 1)[0] if "." in imported else ""
            if imported and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_engine_has_no_import_circle():
    graph = _engine_graph()
    # the package's own __init__ re-exports everything; nothing inside the engine imports it
    graph.pop("attnctl", None)
    assert not any("attnctl" == t for targets in graph.values() for t in targets), "an engine module imports attnctl itself"
    assert import_circles(graph) == []


def test_the_circle_finder_finds_circles():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_import_reader_sees_type_checking_function_level_and_string_imports():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from harmonpaint_recipe.runner import Runner\n"
        "def f():\n    import strategies.kv_bank\n    import importlib\n"
        "    return importlib.import_module('harmonpaint_recipe.commands.inpaint')\n"
        "ENTRY = 'strategies.region_mask'\n"
        "from .sites import Site\n"
    )
    names = names_in(source, "attnctl")
    assert "attnctl.sites.Site" in names
    assert {"harmonpaint_recipe.runner.Runner", "strategies.kv_bank", "harmonpaint_recipe.commands.inpaint",
            "strategies.region_mask"} <= names
