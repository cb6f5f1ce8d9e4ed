"""Binary masks (1 = region to inpaint) from PNG files, COCO polygons or COCO RLE, and boxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from attnctl.errors import InputError


def polygons_to_mask(polygons: list[list[float]], size: tuple[int, int]) -> np.ndarray:
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` -> ``H x W`` uint8 mask; ``size = (W, H)``."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polygons:
        if len(poly) < 6 or len(poly) % 2:
            raise InputError(f"polygon with {len(poly)} coordinates; a COCO polygon lists x, y pairs (>= 3 points)")
        draw.polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)], fill=1)
    return np.asarray(canvas, dtype=np.uint8)


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed COCO RLE ``{"size": [H, W], "counts": [n0, n1, ...]}`` -> mask.

    Counts alternate 0-runs and 1-runs, starting with 0, over the image in column-major order.
    """
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        raise InputError(
            "compressed COCO RLE (a 'counts' string) is not supported; decode it with "
            "pycocotools.mask.decode and save a PNG mask, or give an uncompressed RLE list"
        )
    if sum(counts) != h * w:
        raise InputError(f"RLE counts sum to {sum(counts)} but size is {h}x{w}={h * w}")
    flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(np.uint8)
    return flat.reshape(w, h).T.copy()


def load_mask_png(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """A mask image (white = inpaint), binarized at 0.5 and checked against ``size = (W, H)``."""
    from harmonpaint_recipe.inputs import open_image

    mask = open_image(path, "mask").convert("L")
    if mask.size != tuple(size):
        raise InputError(f"mask '{path}' is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}; resize it to match")
    return (np.asarray(mask) >= 128).astype(np.uint8)


def bbox_mask(mask: np.ndarray) -> np.ndarray:
    """The filled bounding box of a mask's foreground."""
    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask, dtype=np.uint8)
    if len(ys):
        out[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = 1
    return out


def box_to_mask(box: list[float], size: tuple[int, int]) -> np.ndarray:
    """COCO ``[x, y, w, h]`` box -> mask of ``size = (W, H)``."""
    x, y, bw, bh = box
    out = np.zeros((size[1], size[0]), dtype=np.uint8)
    out[int(round(y)) : int(round(y + bh)), int(round(x)) : int(round(x + bw))] = 1
    return out


def mask_to_image(mask: np.ndarray) -> Image.Image:
    """0/1 mask -> black/white ``L`` image."""
    return Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L")
