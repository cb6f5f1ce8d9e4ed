"""Progress bars for long work: on stderr, with elapsed time and an estimate of what is left.

Every long command (bench, eval, ablate, dataset, batch inpaint, probe) shows one, so a run
that takes minutes is never silent; log lines are written above the bar, not through it.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it") -> Any:
    """A ``tqdm`` bar on stderr (``bar.write(line)`` prints above it)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
