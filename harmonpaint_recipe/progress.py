"""Progress on long work: one bar per command on a terminal, one line per item elsewhere.

Every long command (bench, eval, ablate, dataset, batch inpaint, probe) shows its progress on
stderr with elapsed time and an estimate of what is left, so a run that takes minutes is
never silent. On a terminal that is one ``tqdm`` bar (log lines are written above it, not
through it); where stderr is a file or a pipe (a log, CI), a bar would be hundreds of
carriage returns and cursor moves, so each finished item prints one plain line instead.
A command shows one bar: the pipeline's own per-step bar stays off while it draws one
(``step_bar_config``).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Iterator


def on_terminal() -> bool:
    """Whether stderr is a terminal (where bars are drawn)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def step_bar_config(own_bar: bool) -> dict[str, Any]:
    """``pipe.set_progress_bar_config(...)`` for a diffusers pipeline.

    Args:
        own_bar: the command draws its own bar (a batch): the pipeline's per-step bar stays off.
            Otherwise the per-step bar is the command's one bar, drawn on a terminal only.
    """
    return {"disable": True} if own_bar or not on_terminal() else {"disable": False}


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class LineProgress:
    """A progress display printing one line per finished item: ``desc: 3/10 image (12 s, about 28 s left)``.

    It has the part of ``tqdm``'s interface the commands use: iteration, ``update``,
    ``set_postfix_str``, ``write`` and ``close``.
    """

    def __init__(self, iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it"):
        self.iterable = iterable
        self.desc = desc
        self.unit = unit
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total = total
        self.n = 0
        self.postfix = ""
        self.start = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more finished items and print the line for them."""
        self.n += n
        elapsed = time.monotonic() - self.start
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        left = ""
        if self.total and 0 < self.n < self.total:
            left = f", about {_clock(elapsed / self.n * (self.total - self.n))} left"
        postfix = f" [{self.postfix}]" if self.postfix else ""
        print(f"{self.desc}: {count} {self.unit} ({_clock(elapsed)}{left}){postfix}", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        """Shown on the next line."""
        self.postfix = text

    def write(self, line: str) -> None:
        """Print a log line."""
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Nothing to clear: every line is final."""


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it") -> Any:
    """A ``tqdm`` bar on a terminal, a ``LineProgress`` elsewhere; both on stderr (``bar.write(line)`` logs)."""
    if not on_terminal():
        return LineProgress(iterable, desc=desc, total=total, unit=unit)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
