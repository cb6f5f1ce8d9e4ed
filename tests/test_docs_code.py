"""Every code block of README.md and docs/*.md runs as pasted.

- ``python`` blocks of a page run in order in one fresh module namespace, as a reader pasting
  them into one session would;
- ``bash`` blocks: each ``attnctl ...`` command runs through the real command line, in a
  temporary folder with ``examples/`` linked in, offline (``HF_HUB_OFFLINE=1``). It must
  succeed, or, where it names a model from the hub (real weights, which cannot be downloaded
  here), stop with exit code 2 and the documented offline message. Environment commands
  (``pip``, ``apt-get``, ``python -m pytest``, ``accelerate launch``, ``scripts/...``) are
  what CI itself runs and are not repeated here;
- ``yaml`` / ``toml`` / ``json`` blocks must parse;
- blocks without a language are equations and diagrams, not code.

A block preceded by ``<!-- not run by the docs test: REASON -->`` is reported as skipped
with that reason (GPU-only commands, web servers, runs that take many minutes).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (the test extra installs it)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"(?:<!-- not run by the docs test: (?P<skip>[^>]*?) -->\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```",
                    re.S | re.M)
_ENVIRONMENT = ("pip ", "python -m pip", "apt-get", "python -m pytest", "accelerate launch", "scripts/")
_LOCAL_INSTALL = re.compile(r"^pip install -e (examples/[\w./-]+)$")


@dataclass(frozen=True)
class Block:
    page: str
    index: int
    lang: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.page}#{self.index}-{self.lang}"


def blocks(page: str) -> list[Block]:
    text = (ROOT / page).read_text(encoding="utf-8")
    return [Block(page, i + 1, m["lang"], m["code"], m["skip"]) for i, m in enumerate(_FENCE.finditer(text))
            if m["lang"]]


ALL = [b for page in PAGES for b in blocks(page)]


def commands(code: str) -> list[str]:
    """The shell commands of a bash block: continuations joined, comments dropped, ``&&`` split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            out += [part.strip() for part in line.split("&&")]
    return out


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def _run_command(command: str, capsys) -> None:
    from attnctl.cli import main

    argv = shlex.split(command)
    assert argv[0] == "attnctl", f"unexpected command in a docs block: {command}"
    capsys.readouterr()
    rc = main(argv[1:])
    err = capsys.readouterr().err
    if rc == 2 and "HF_HUB_OFFLINE=1" in err:  # needs real weights from the hub: the documented offline stop
        return
    assert rc == 0, f"`{command}` exited {rc}:\n{err[-2000:]}"


@pytest.mark.parametrize("page", PAGES)
def test_python_blocks_run_as_pasted(page, workdir, monkeypatch):
    runnable = [b for b in blocks(page) if b.lang == "python"]
    skipped = [b for b in runnable if b.skip]
    runnable = [b for b in runnable if not b.skip]
    if not runnable:
        pytest.skip(f"{page}: no python block to run" + "".join(f"; {b.id}: {b.skip}" for b in skipped))
    name = "docs_" + re.sub(r"\W", "_", page)
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    for block in runnable:
        try:
            exec(compile(block.code, block.id, "exec"), module.__dict__)
        except Exception as exc:  # name the block, keep the traceback
            raise AssertionError(f"{block.id} failed: {exc!r}") from exc


def _install_example(package: Path, site: Path, monkeypatch) -> None:
    """``pip install -e examples/PKG`` as far as the test needs it: the package importable and its
    entry points registered (a dist-info on ``sys.path``), without touching the environment."""
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = project.get("entry-points", {})
    (info / "entry_points.txt").write_text(
        "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for g, eps in groups.items())
    )
    monkeypatch.syspath_prepend(str(package))
    monkeypatch.syspath_prepend(str(site))


@pytest.mark.parametrize("block", [b for b in ALL if b.lang in ("bash", "sh", "console")], ids=lambda b: b.id)
def test_shell_blocks_run_as_pasted(block, workdir, capsys, monkeypatch):
    if block.skip:
        pytest.skip(block.skip)
    ran = 0
    for command in commands(block.code):
        local = _LOCAL_INSTALL.match(command)
        if local:  # an example package of this repository
            _install_example(ROOT / local[1], workdir / "site", monkeypatch)
            continue
        if command.startswith(_ENVIRONMENT):
            continue
        _run_command(command, capsys)
        ran += 1
    if not ran:
        pytest.skip("only environment commands (install, CI), which CI runs itself")


@pytest.mark.parametrize("block", [b for b in ALL if b.lang in ("yaml", "toml", "json")], ids=lambda b: b.id)
def test_data_blocks_parse(block):
    if block.lang == "yaml":
        yaml.safe_load(block.code)
    elif block.lang == "toml":
        tomllib.loads(block.code)
    else:
        try:
            json.loads(block.code)
        except json.JSONDecodeError:  # JSON Lines: one object per line
            for line in filter(str.strip, block.code.splitlines()):
                json.loads(line)


def test_every_page_is_covered():
    assert "README.md" in PAGES and "docs/writing-strategies.md" in PAGES and len(ALL) > 20
