"""Output files: atomic writing (temp file in the same folder + ``os.replace``), hashing, JSONL reading.

Every file attnctl writes goes through here, so no reader ever sees a half-written output.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not atomic, hence the /proc path first)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or the complete new one.

    The file gets the permissions a plain ``open(path, "wb")`` would give (0666 minus the
    umask), not the private 0600 of a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text variant of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """JSON variant of :func:`atomic_write_bytes` (sorted keys, so reruns give identical bytes)."""
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    """One JSON object per line, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


_IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def atomic_save_image(path: str | Path, image: Image.Image) -> None:
    """Save ``image`` atomically, in the format its suffix names (PNG when unknown)."""
    import io as _io

    buf = _io.BytesIO()
    image.save(buf, format=_IMAGE_FORMATS.get(Path(path).suffix.lower(), "PNG"))
    atomic_write_bytes(path, buf.getvalue())


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_jsonl_objects(path: Path, where: Callable[[int], str]) -> Iterator[tuple[int, str, dict]]:
    """``(line number, where, row)`` for every JSON object line of a manifest.

    Blank lines and ``#`` comment lines are skipped. ``where(lineno)`` names the line in
    errors; a line that is not valid JSON or not a JSON object raises ``InputError``.
    """
    from attnctl.errors import InputError

    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        label = where(lineno)
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{label}: not valid JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise InputError(f"{label}: expected a JSON object, got {type(row).__name__}; write one object per line")
        yield lineno, label, row
