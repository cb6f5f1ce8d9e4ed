"""The app's output folder: checked and claimed before the model loads, cleaned of what an
interrupted server left.

One server writes to a folder at a time: it holds an exclusive lock on
``OUT_DIR/.attnctl-app.lock`` while it runs (the kernel drops the lock when the process ends,
however it ends). Holding it, the server may remove the temporary files (``.NAME.*.tmp``,
see ``files.atomic_write_bytes``) that a server killed in the middle of a write left behind:
nobody else is writing there. Every finished output was renamed into place whole, so a
half-written file is never visible under an output's name.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from attnctl.errors import InputError

LOCK_NAME = ".attnctl-app.lock"


@dataclass
class ClaimedFolder:
    """An output folder this process writes to, and what was cleaned up when it was claimed."""

    path: Path
    lock: IO[str]
    removed: list[Path] = field(default_factory=list)
    #: output images of earlier runs without their sidecar (a server stopped between the two writes)
    unrecorded: list[Path] = field(default_factory=list)

    def release(self) -> None:
        """Give the folder up (the lock file stays; it is empty)."""
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        self.lock.close()


def _leftovers(root: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes, in the folder and its run folders."""
    return sorted(p for pattern in (".*.tmp", "*/.*.tmp") for p in root.glob(pattern) if p.is_file())


def _unrecorded(root: Path) -> list[Path]:
    """Output images (``*_A-*.png``, ``*_B-*.png``) whose sidecar JSON is missing."""
    return sorted(p for pattern in ("*/*_A-*.png", "*/*_B-*.png") for p in root.glob(pattern)
                  if not p.with_suffix(".json").is_file())


def claim_out_dir(out_dir: str | Path) -> ClaimedFolder:
    """Create ``out_dir`` if needed, check that it can be written, lock it, remove leftovers.

    Raises:
        InputError: the folder cannot be made or written, or another server writes to it.
    """
    root = Path(out_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / LOCK_NAME, "a+", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"--out-dir '{root}' cannot be used ({exc.strerror or exc}); give a folder this user "
                         "can write to") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise InputError(f"--out-dir '{root}' is in use by another attnctl app ({holder}); stop it, or give this "
                         "one another --out-dir") from None
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
    except OSError as exc:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        raise InputError(f"--out-dir '{root}' cannot be written ({exc.strerror or exc}); give a folder this user "
                         "can write to") from None
    claimed = ClaimedFolder(root, lock)
    for leftover in _leftovers(root):
        try:
            leftover.unlink()
            claimed.removed.append(leftover)
        except OSError:
            pass
    claimed.unrecorded = _unrecorded(root)
    return claimed
