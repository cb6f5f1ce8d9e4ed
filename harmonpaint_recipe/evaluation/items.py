"""The evaluation manifest: one JSON object per line.

Required keys: ``id`` (unique), ``image`` (source image), ``mask`` (white = inpaint) and
``prompt``. Optional: ``seed`` (int), any other mask key selected with ``--mask-key`` (e.g.
``bbox_mask`` from ``attnctl dataset``). Relative paths are resolved against the manifest's
folder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from attnctl.errors import InputError
from harmonpaint_recipe.files import iter_jsonl_objects

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True)
class EvalItem:
    """One item to inpaint and score."""

    id: str
    image_path: Path
    mask_path: Path
    prompt: str
    seed: int | None = None

    def load(self) -> tuple[Image.Image, Image.Image, np.ndarray]:
        """``(source RGB, mask L image binarized, mask as 0/1 float array)``."""
        image = Image.open(self.image_path).convert("RGB")
        mask_img = Image.open(self.mask_path).convert("L")
        if mask_img.size != image.size:
            raise InputError(
                f"item '{self.id}': mask '{self.mask_path}' is {mask_img.size[0]}x{mask_img.size[1]} but the image is "
                f"{image.size[0]}x{image.size[1]}; resize the mask to the image size"
            )
        mask = (np.asarray(mask_img) >= 128).astype(np.float64)
        return image, Image.fromarray((mask * 255).astype(np.uint8), mode="L"), mask


def load_items(path: str | Path, mask_key: str = "mask") -> list[EvalItem]:
    """Parse and validate the manifest (files must exist, ids must be unique and file-name safe)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--data '{path}' does not exist; build one with `attnctl dataset sample --out DIR`")
    items: list[EvalItem] = []
    seen: set[str] = set()
    for _, where, row in iter_jsonl_objects(path, lambda n: f"--data '{path}' line {n}"):
        missing = [k for k in ("id", "image", mask_key, "prompt") if k not in row]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)} (each line needs id, image, {mask_key}, prompt)")
        item_id = str(row["id"])
        if not _SAFE_ID.match(item_id):
            raise InputError(f"{where}: id '{item_id}' must use only letters, digits, '.', '_' or '-' (it names files)")
        if item_id in seen:
            raise InputError(f"{where}: duplicate id '{item_id}'")
        seen.add(item_id)
        image, mask = path.parent / row["image"], path.parent / row[mask_key]
        for label, p in (("image", image), (mask_key, mask)):
            if not p.is_file():
                raise InputError(f"{where}: {label} '{p}' does not exist")
        seed = row.get("seed")
        items.append(EvalItem(item_id, image, mask, str(row["prompt"]), int(seed) if seed is not None else None))
    if not items:
        raise InputError(f"--data '{path}' has no items")
    return items
