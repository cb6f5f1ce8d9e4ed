"""Comparison grids: one row per item (input, mask, each method), a labelled header row."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from harmonpaint_recipe.files import atomic_write_bytes

CELL = 128
HEADER = 18
ROWS_PER_GRID = 8


def _cell(image: Image.Image, cell: int) -> Image.Image:
    return image.convert("RGB").resize((cell, cell), Image.BICUBIC)


def write_grids(items: Sequence, methods: Sequence[str], store, cell: int = CELL, rows: int = ROWS_PER_GRID) -> list[Path]:
    """Write ``grids/grid_NNN.png`` (``rows`` items each) and return their paths."""
    labels = ["input", "mask", *methods]
    paths = []
    for g, start in enumerate(range(0, len(items), rows)):
        chunk = items[start : start + rows]
        grid = Image.new("RGB", (cell * len(labels), HEADER + cell * len(chunk)), "white")
        draw = ImageDraw.Draw(grid)
        for c, label in enumerate(labels):
            draw.text((c * cell + 4, 3), label[: cell // 6], fill="black")
        for r, item in enumerate(chunk):
            source, mask_img, _ = item.load()
            cells = [source, mask_img] + [Image.open(store.output(m, item.id)) for m in methods]
            for c, im in enumerate(cells):
                grid.paste(_cell(im, cell), (c * cell, HEADER + r * cell))
        buf = io.BytesIO()
        grid.save(buf, format="PNG")
        path = store.root / "grids" / f"grid_{g:03d}.png"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths
