"""A ready benchmark sample built from scikit-image's bundled public-domain / CC0 images.

Content images: ``chelsea`` (CC0), ``coffee`` (CC0), ``astronaut`` (public domain, NASA),
``rocket`` (public domain, SpaceX). Style images: ``hubble_deep_field`` (public domain,
NASA/ESA), ``immunohistochemistry`` (public domain), ``colorwheel`` (generated). Masks are
ellipses drawn around the main object, stored as COCO polygons, so the sample runs fully
offline through the same path as ``attnctl dataset stylize``.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from harmonpaint_recipe.progress import progress
from harmonpaint_recipe.files import atomic_write_jsonl
from harmonpaint_recipe.dataset.manifest import write_item
from harmonpaint_recipe.dataset.masks import polygons_to_mask

# name, caption, ellipse (cx, cy, rx, ry) in the original pixels, style
SAMPLE_ITEMS: tuple[tuple[str, str, tuple[int, int, int, int], str], ...] = (
    ("chelsea", "a cat", (225, 150, 105, 95), "hubble_deep_field"),
    ("coffee", "a cup of coffee on a saucer", (300, 200, 190, 140), "immunohistochemistry"),
    ("astronaut", "an astronaut in a white space suit", (220, 200, 120, 150), "colorwheel"),
    ("rocket", "a rocket on the launch pad", (320, 200, 50, 170), "hubble_deep_field"),
)


def ellipse_polygon(cx: float, cy: float, rx: float, ry: float, n: int = 32) -> list[float]:
    """A COCO polygon approximating an ellipse."""
    pts: list[float] = []
    for k in range(n):
        a = 2 * math.pi * k / n
        pts += [cx + rx * math.cos(a), cy + ry * math.sin(a)]
    return pts


def _skimage(name: str) -> Image.Image:
    from harmonpaint_recipe.extras import require

    require("eval", "skimage", what="attnctl dataset sample (scikit-image's bundled images)")
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB")


def build_sample(out: str | Path, *, size: int = 256, mode: str = "stats", limit: int | None = None) -> Path:
    """Write the sample benchmark to ``out``; return the ``items.jsonl`` path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # an unusable --out fails here, before any work
    rows = []
    for name, caption, ellipse, style in progress(SAMPLE_ITEMS[:limit], desc="dataset sample", unit="item"):
        content = _skimage(name)
        seg = polygons_to_mask([ellipse_polygon(*ellipse)], content.size)
        rows.append(
            write_item(out, name, content, _skimage(style), seg, caption, size=size, mode=mode,
                       style_name=f"skimage:{style}", content_name=f"skimage:{name}")
        )
    atomic_write_jsonl(out / "items.jsonl", [r for r in rows if r is not None])
    return out / "items.jsonl"
