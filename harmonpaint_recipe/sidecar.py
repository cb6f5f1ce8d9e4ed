"""Sidecar JSON written next to every output image: everything needed to reproduce it."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image

from attnctl.errors import InputError
from harmonpaint_recipe.files import atomic_save_image, atomic_write_bytes

SIDECAR_VERSION = 1
_PACKAGES = ("attnctl", "torch", "diffusers", "transformers", "omegaconf", "pillow", "numpy")


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the output."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def sidecar_path(image_path: str | Path) -> Path:
    """``out.png`` -> ``out.json``."""
    return Path(image_path).with_suffix(".json")


def save_image_atomic(image: Image.Image, path: Path) -> None:
    """Save ``image`` to ``path`` atomically (format from the suffix)."""
    atomic_save_image(path, image)


def write_sidecar(path: Path, record: dict[str, Any]) -> None:
    """Write the sidecar JSON atomically."""
    atomic_write_bytes(path, (json.dumps(record, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Read a sidecar written by ``attnctl inpaint``; ``InputError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"sidecar file '{path}' does not exist; give the .json written next to an output image")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"sidecar file '{path}' is not valid JSON ({exc})") from None
    missing = [k for k in ("recipe", "seed", "prompt", "inputs") if k not in record]
    if not isinstance(record, dict) or missing:
        raise InputError(f"'{path}' is not an attnctl inpaint sidecar (missing {', '.join(missing)})")
    return record
