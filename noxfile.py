"""The test suite on every supported Python: ``pip install nox && nox``.

Sessions ``tests-3.10`` ... ``tests-3.13`` (``nox --list``): the README's install (torch,
then the ``test`` extra) in a virtual environment of that Python, then the whole suite.
Arguments after ``--`` replace pytest's, e.g. ``nox -s tests-3.12 -- -q tests/test_app.py``;
the fast part CI runs on the oldest and the newest Python is
``nox -s tests-3.10 tests-3.13 -- -q -m "not slow and not browser" tests``.
``nox -R`` reuses the environments made before (no install, nothing downloaded).

Interpreters are looked up on PATH as ``python3.X``; on a machine with pyenv, every
installed pyenv version is made visible for the run (pyenv's shims only answer for the
versions ``PYENV_VERSION`` names). Nothing is downloaded to get a Python.

torch: Python 3.11 takes ``torch==2.13.0`` as the README does (a CPU build where pip finds
one, as on our machines); the others take ``torch==2.14.1``, PyPI's Linux build (it carries
CUDA libraries, which pip takes from a local index where one is configured, and runs on the
CPU without a GPU). ``NOX_TORCH="torch==X"`` picks another for every session.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: the torch each Python gets (see the module docstring); any other Python: TORCH_DEFAULT
TORCH = {"3.11": "torch==2.13.0"}
TORCH_DEFAULT = "torch==2.14.1"

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
nox.options.download_python = "never"


def _show_pyenv_versions() -> None:
    """Let pyenv's shims answer for every installed version (``python3.10``, ``python3.12``, ...)."""
    if os.environ.get("PYENV_VERSION") or shutil.which("pyenv") is None:
        return
    listed = subprocess.run(["pyenv", "versions", "--bare", "--skip-aliases"], capture_output=True, text=True)
    versions = [v for v in listed.stdout.split() if v[:1].isdigit() and "/" not in v]
    if listed.returncode == 0 and versions:
        current = subprocess.run(["pyenv", "version-name"], capture_output=True, text=True).stdout.strip()
        first = [v for v in current.split(":") if v in versions]
        os.environ["PYENV_VERSION"] = ":".join(first + [v for v in versions if v not in first])


_show_pyenv_versions()


def _install(session: nox.Session) -> None:
    """torch, then the package with its ``test`` extra (the README's install and test commands)."""
    torch = os.environ.get("NOX_TORCH") or TORCH.get(str(session.python), TORCH_DEFAULT)
    session.install(torch)
    session.install("-e", ".[test]")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The suite (pytest's arguments: ``-q tests`` unless given after ``--``)."""
    _install(session)
    session.run("python", "-m", "pytest", *(session.posargs or ["-q", "tests"]),
                env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
