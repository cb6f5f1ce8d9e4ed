"""The sidecar record written next to every output image: everything needed to reproduce it."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from attnctl.errors import InputError
from harmonpaint_recipe.files import atomic_write_bytes, sha256_of

SIDECAR_FORMAT = "attnctl-inpaint/1"
_PACKAGES = ("attnctl", "torch", "diffusers", "transformers", "omegaconf", "pillow", "numpy")


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


def sidecar_record(
    *,
    out: Path,
    image: Path,
    mask: Path,
    prompt: str,
    seed: int,
    recipe: Any,
    recipe_name: str,
    overrides: Sequence[str],
    pipe: Any,
    notes: Sequence[str],
    resize_mask: bool,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Everything needed to reproduce the image at ``out`` (written already: its hash is recorded)."""
    from attnctl.backbones import denoiser_of

    from harmonpaint_recipe.devices import dtype_name
    from harmonpaint_recipe.loading import resolved

    return {
        "format": SIDECAR_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output": {"path": str(out.resolve()), "sha256": sha256_of(out)},
        "prompt": prompt,
        "seed": seed,
        "recipe_name": recipe_name,
        "overrides": list(overrides),
        "recipe": resolved(recipe),
        "model": {
            "id": getattr(pipe, "_attnctl_model_id", None) or str(recipe.model.pretrained),
            "pipeline": type(pipe).__name__,
            "device": str(pipe.device),
            "dtype": dtype_name(denoiser_of(pipe).dtype),
        },
        "inputs": {
            "image": {"path": str(image.resolve()), "sha256": sha256_of(image)},
            "mask": {"path": str(mask.resolve()), "sha256": sha256_of(mask)},
            "resize_mask": resize_mask,
            "notes": list(notes),
        },
        # CPU results are bit-identical only with the same thread count; --from reuses it
        "threads": _torch_threads(),
        "versions": package_versions(),
        "timings": dict(timings),
    }


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


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
