"""Quiet, one-line notices for the command line.

Libraries print notices a user of ``attnctl`` cannot act on (transformers' "requires
torchvision, falling back to the PIL image processor", once per processor class), and Python
shows warnings with a source line from deep inside torch's hook machinery. On the command
line, notices the user cannot act on are dropped and every warning is one line that says
which command it comes from. The Python API leaves logging and warnings as the caller set them.

Showing a warning imports nothing. The garbage collector can finalize an object (and so
emit its warning) in the middle of an import; an import made from there corrupts the
import lock's bookkeeping on CPython 3.10 and 3.11 (``KeyError`` from
``importlib._bootstrap._ModuleLock.acquire``), which is how Gradio's dropped event loops
once stopped ``attnctl app`` from starting. ``ResourceWarning``s (unclosed files, sockets,
event loops) stay ignored, as Python ignores them by default: they are about how libraries
manage their resources, nothing a user can act on.
"""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

#: (logger name, text) of library notices nobody using attnctl can act on
UNACTIONABLE = (
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
)
#: warnings (message regex) raised inside libraries about how they call each other
UNACTIONABLE_WARNINGS = (
    r".*`local_dir_use_symlinks` argument is deprecated",
)


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_library_notices() -> None:
    """Drop the library notices in ``UNACTIONABLE`` (idempotent)."""
    for name, text in UNACTIONABLE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))


def _drawing_bar_class() -> type | None:
    """The class of a tqdm bar that is drawing, or None; imports nothing.

    A drawing bar's class made its write lock when the bar was made, so writing through it
    does not import (tqdm imports multiprocessing when it makes its first lock).
    """
    bar_class = getattr(sys.modules.get("tqdm"), "tqdm", None)
    bars = list(getattr(bar_class, "_instances", None) or ())
    return type(bars[0]) if bars else None


def print_line(line: str) -> None:
    """Print on stderr on a line of its own, above any progress bar that is drawing.

    Imports nothing (see the module docstring): it runs inside warning hooks.
    """
    bar_class = _drawing_bar_class()
    if bar_class is not None:
        bar_class.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


@contextmanager
def warnings_as_lines(prog: str) -> Iterator[None]:
    """Within the block, each warning prints as ``PROG: warning: message`` on stderr, once per message."""
    shown: set[str] = set()
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message).strip()
        if text not in shown:
            shown.add(text)
            print_line(f"{prog}: warning: {text}")

    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=ResourceWarning)
            for pattern in UNACTIONABLE_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        warnings.showwarning = previous
