"""docs/compatibility.md: its code blocks run as pasted, the tests it cites exist, the README links it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "compatibility.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_code_block_runs_as_pasted(index, capsys):
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    try:
        exec(compile(python_blocks()[index], f"{DOC.name}[block {index}]", "exec"), {"__name__": "__docs__"})
    finally:
        diffusers_logging.set_verbosity(level)
    assert capsys.readouterr().out.strip()  # every block prints what it shows


def test_cited_tests_exist_and_readme_links_the_page():
    text = DOC.read_text(encoding="utf-8")
    cited = set(re.findall(r"`(test_compat_\w+\.py)`", text))
    assert cited == {p.name for p in (ROOT / "tests" / "compat").glob("test_compat_*.py")} - {"test_compat_docs.py"}
    for path in re.findall(r"`(tests/test_\w+\.py)`", text):
        assert (ROOT / path).is_file(), path
    assert "docs/compatibility.md" in (ROOT / "README.md").read_text(encoding="utf-8")
