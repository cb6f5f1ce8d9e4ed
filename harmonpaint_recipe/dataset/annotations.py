"""The annotation file of ``attnctl dataset stylize``.

A JSON list or a JSONL file of records, one per object to inpaint::

    {"image": "000123.jpg",            # content image, relative to --content
     "caption": "a cat on a sofa",     # the inpainting prompt
     "id": "000123_cat",               # optional; default: image stem + record index
     "style": "monet.jpg",             # optional style image in --styles; default: round robin
     "mask": "000123_cat.png"}         # segmentation as a PNG (white = object) relative to --content

Instead of ``mask`` a record may carry COCO-style ``segmentation``: a list of polygons
``[[x1, y1, x2, y2, ...], ...]`` or an uncompressed RLE ``{"size": [H, W], "counts": [...]}``.
``bbox`` (COCO ``[x, y, w, h]``) is optional: the bounding-box mask defaults to the
segmentation's bounding box.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnctl.errors import InputError


@dataclass
class Annotation:
    """One validated record of the annotation file."""

    id: str
    image: str
    caption: str
    style: str | None = None
    mask: str | None = None
    segmentation: Any = None
    bbox: list[float] | None = None


def load_annotations(path: str | Path) -> list[Annotation]:
    """Parse and validate an annotation file (JSON list or JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--annotations '{path}' does not exist; give a JSON or JSONL file (see docs/evaluation.md)")
    text = path.read_text(encoding="utf-8")
    try:
        stripped = text.lstrip()
        rows = json.loads(text) if stripped.startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as exc:
        raise InputError(f"--annotations '{path}' is not valid JSON/JSONL: {exc}") from exc
    out: list[Annotation] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"--annotations '{path}' record {i}"
        if not isinstance(row, dict) or "image" not in row or "caption" not in row:
            raise InputError(f"{where}: needs at least 'image' and 'caption'")
        if "mask" not in row and "segmentation" not in row:
            raise InputError(f"{where}: give a 'mask' PNG or a COCO 'segmentation' (polygons or RLE)")
        ann_id = str(row.get("id") or f"{Path(row['image']).stem}_{i}")
        if ann_id in seen:
            raise InputError(f"{where}: duplicate id '{ann_id}'; ids must be unique")
        seen.add(ann_id)
        out.append(
            Annotation(
                id=ann_id, image=row["image"], caption=str(row["caption"]), style=row.get("style"),
                mask=row.get("mask"), segmentation=row.get("segmentation"), bbox=row.get("bbox"),
            )
        )
    if not out:
        raise InputError(f"--annotations '{path}' has no records")
    return out
