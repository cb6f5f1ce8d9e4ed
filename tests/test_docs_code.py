"""Every Python code block of the docs runs as pasted (on the tiny random-weight model).

Blocks of one page run in order in one fresh module namespace, as a reader pasting them into
one session would; the working directory is a temporary folder with ``examples/`` linked in.
"""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["docs/writing-strategies.md", "docs/compatibility.md", "docs/probes.md"]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    """The ```python blocks of a Markdown page, in order."""
    return _BLOCK.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run_as_pasted(page, tmp_path, monkeypatch):
    blocks = python_blocks(ROOT / page)
    assert blocks, f"{page} has no python block"
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    name = "docs_" + re.sub(r"\W", "_", page)
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page} block {i + 1}", "exec"), module.__dict__)
        except Exception as exc:  # name the block, keep the traceback
            raise AssertionError(f"{page}: python block {i + 1} failed: {exc!r}") from exc
