"""Build a Stylized-COCO-like benchmark: stylized images, masks, captions and ``items.jsonl``.

Layout written under ``out``::

    items.jsonl                 one item per line (paths relative to this file)
    images/<id>.png             stylized image
    masks/<id>_seg.png          segmentation mask (white = region to inpaint)
    masks/<id>_bbox.png         bounding-box mask

An item is ``{"id", "image", "mask", "bbox_mask", "prompt", "style", "content"}``;
``attnctl eval --mask-key bbox_mask`` evaluates with the box masks.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from attnctl.errors import InputError
from harmonpaint_recipe.dataset.annotations import Annotation, load_annotations
from harmonpaint_recipe.files import atomic_save_image, atomic_write_jsonl
from harmonpaint_recipe.inputs import open_image
from harmonpaint_recipe.progress import progress
from harmonpaint_recipe.dataset.masks import (
    bbox_mask, box_to_mask, load_mask_png, mask_to_image, polygons_to_mask, rle_to_mask,
)
from harmonpaint_recipe.dataset.stylize import stylize

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def center_square(image: Image.Image, size: int, resample: int) -> Image.Image:
    """Center-crop to a square and resize to ``size`` (``size <= 0``: unchanged)."""
    if size <= 0:
        return image
    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), resample)


def write_item(
    out: Path, item_id: str, content: Image.Image, style: Image.Image, seg: np.ndarray,
    caption: str, *, size: int, mode: str, style_name: str, content_name: str, box: np.ndarray | None = None,
) -> dict | None:
    """Stylize one content image, write it and its masks; ``None`` if the mask ends up empty."""
    image = center_square(stylize(content, style, mode=mode), size, Image.BICUBIC)
    seg_img = center_square(mask_to_image(seg), size, Image.NEAREST)
    box_img = center_square(mask_to_image(bbox_mask(seg) if box is None else box), size, Image.NEAREST)
    if not np.asarray(seg_img).any():
        return None
    atomic_save_image(out / "images" / f"{item_id}.png", image)
    atomic_save_image(out / "masks" / f"{item_id}_seg.png", seg_img)
    atomic_save_image(out / "masks" / f"{item_id}_bbox.png", box_img)
    return {
        "id": item_id, "image": f"images/{item_id}.png", "mask": f"masks/{item_id}_seg.png",
        "bbox_mask": f"masks/{item_id}_bbox.png", "prompt": caption, "style": style_name, "content": content_name,
    }


def _segmentation(ann: Annotation, content_dir: Path, size: tuple[int, int]) -> np.ndarray:
    if ann.mask:
        return load_mask_png(content_dir / ann.mask, size)
    seg = ann.segmentation
    if isinstance(seg, dict):
        mask = rle_to_mask(seg)
        if mask.shape != (size[1], size[0]):
            raise InputError(f"annotation '{ann.id}': RLE size {list(mask.shape)} differs from its image {size[1]}x{size[0]}")
        return mask
    if isinstance(seg, list) and seg and isinstance(seg[0], (int, float)):
        seg = [seg]  # a single flat polygon
    if not isinstance(seg, list):
        raise InputError(f"annotation '{ann.id}': 'segmentation' must be COCO polygons or an RLE dict")
    return polygons_to_mask(seg, size)


def _check_out(out: Path, inputs: list[Path]) -> None:
    for p in inputs:
        if out.resolve() == p.resolve() or p.resolve() in (out / "items.jsonl").resolve().parents:
            raise InputError(f"--out '{out}' is an input folder ('{p}'); choose a new output folder so inputs are never overwritten")


def build_stylized_manifest(
    content_dir: str | Path, styles_dir: str | Path, annotations: str | Path, out: str | Path,
    *, size: int = 512, mode: str = "stats",
) -> Path:
    """Build the benchmark described in the module docstring; return the ``items.jsonl`` path."""
    content_dir, styles_dir, out = Path(content_dir), Path(styles_dir), Path(out)
    for flag, d in (("--content", content_dir), ("--styles", styles_dir)):
        if not d.is_dir():
            raise InputError(f"{flag} '{d}' is not a folder")
    _check_out(out, [content_dir, styles_dir])
    styles = sorted(p for p in styles_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not styles:
        raise InputError(f"--styles '{styles_dir}' has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    rows = []
    annotations_list = load_annotations(annotations)
    for i, ann in enumerate(progress(annotations_list, desc="dataset stylize", unit="item")):
        src = content_dir / ann.image
        if not src.is_file():
            raise InputError(f"annotation '{ann.id}': content image '{src}' does not exist")
        style_path = styles_dir / ann.style if ann.style else styles[i % len(styles)]
        if not style_path.is_file():
            raise InputError(f"annotation '{ann.id}': style image '{style_path}' does not exist")
        content = open_image(src, f"annotation '{ann.id}': content image").convert("RGB")
        seg = _segmentation(ann, content_dir, content.size)
        box = box_to_mask(ann.bbox, content.size) if ann.bbox else None
        row = write_item(
            out, ann.id, content, open_image(style_path, f"annotation '{ann.id}': style image").convert("RGB"), seg,
            ann.caption,
            size=size, mode=mode, style_name=style_path.name, content_name=ann.image, box=box,
        )
        if row is None:
            print(f"skipped '{ann.id}': its mask is empty after cropping to a square", file=sys.stderr)
        else:
            rows.append(row)
    if not rows:
        raise InputError("no item left: every mask was empty after cropping; use --size 0 to keep full images")
    atomic_write_jsonl(out / "items.jsonl", rows)
    return out / "items.jsonl"
