"""docs/compatibility.md cites the tests that exist, and the README links it (its code blocks
run in tests/test_docs_code.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "compatibility.md"


def test_cited_tests_exist_and_readme_links_the_page():
    text = DOC.read_text(encoding="utf-8")
    cited = set(re.findall(r"`(test_compat_\w+\.py)`", text))
    assert cited == {p.name for p in (ROOT / "tests" / "compat").glob("test_compat_*.py")} - {"test_compat_docs.py"}
    for path in re.findall(r"`(tests/test_\w+\.py)`", text):
        assert (ROOT / path).is_file(), path
    assert "docs/compatibility.md" in (ROOT / "README.md").read_text(encoding="utf-8")
