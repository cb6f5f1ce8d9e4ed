"""World scenes written to disk: inputs for ``attnctl inpaint`` / ``attnctl eval`` and pictures.

``write_samples(folder, count)`` writes, for scene ``i`` of a split (id ``<split>-<i>``):

- ``images/<id>.png``: the background alone (the image to inpaint into);
- ``masks/<id>.png``: the mask (white = inpaint);
- ``truth/<id>_flat.png`` and ``truth/<id>_styled.png``: the two ground-truth renderings;
- one line in ``items.jsonl``: ``id, image, mask, prompt`` (the object alone, as an
  ``attnctl eval`` item) plus ``styled_prompt``, ``style``, ``shape``, ``colour``,
  ``mask_kind``, ``scene`` and ``split``;
- one line in ``inpaint.jsonl``: ``name, image, mask, prompt, seed`` (the scene number), the
  same scenes as an ``attnctl inpaint --manifest`` batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from attnctl.errors import InputError
from harmonpaint_recipe.files import atomic_save_image, atomic_write_jsonl
from harmonpaint_recipe.testbed.world import SPLITS, Scene, render, render_scene, sample_scene


def scene_id(scene: Scene) -> str:
    """``eval-0007``: the file-name id of a scene."""
    return f"{scene.split}-{scene.seed:04d}"


def scene_record(scene: Scene) -> dict:
    """The ``items.jsonl`` line of a scene (paths relative to the manifest)."""
    sid = scene_id(scene)
    return {
        "id": sid, "image": f"images/{sid}.png", "mask": f"masks/{sid}.png", "prompt": scene.caption(False),
        "styled_prompt": scene.caption(True), "style": scene.style, "shape": scene.shape, "colour": scene.colour,
        "mask_kind": scene.mask_kind, "scene": scene.seed, "split": scene.split,
        "truth_flat": f"truth/{sid}_flat.png", "truth_styled": f"truth/{sid}_styled.png",
    }


def write_samples(folder: Path, count: int = 8, start: int = 0, split: str = "demo",
                  mask_kind: str | None = None) -> list[dict]:
    """Write ``count`` scenes starting at ``start`` (layout in the module docstring)."""
    if count < 1:
        raise InputError(f"--count must be at least 1, got {count}")
    if start < 0:
        raise InputError(f"--start must be >= 0, got {start}")
    if split not in SPLITS:
        raise InputError(f"--split '{split}' is not one of {', '.join(SPLITS)}")
    folder = Path(folder)
    records = []
    for i in range(start, start + count):
        scene = sample_scene(i, split, mask_kind=mask_kind)
        rendered = render_scene(scene)
        rec = scene_record(scene)
        atomic_save_image(folder / rec["image"], Image.fromarray(render(scene, "background")))
        atomic_save_image(folder / rec["mask"], Image.fromarray(rendered.mask, mode="L"))
        atomic_save_image(folder / rec["truth_flat"], Image.fromarray(rendered.flat))
        atomic_save_image(folder / rec["truth_styled"], Image.fromarray(rendered.styled))
        records.append(rec)
    atomic_write_jsonl(folder / "items.jsonl", records)
    atomic_write_jsonl(folder / "inpaint.jsonl", [inpaint_line(rec) for rec in records])
    return records


def inpaint_line(record: dict) -> dict:
    """The ``inpaint.jsonl`` line of a scene record: only the keys ``attnctl inpaint --manifest`` reads,
    with the scene number as the noise seed (so every recipe draws a scene from the same noise)."""
    return {"name": record["id"], "image": record["image"], "mask": record["mask"], "prompt": record["prompt"],
            "seed": record["scene"]}


def world_grid(count: int = 12, start: int = 0, split: str = "demo", scale: int = 2) -> Image.Image:
    """A picture of ``count`` scenes: per scene a column with the styled rendering, the flat
    rendering and the mask, each captioned underneath."""
    cell = 64 * scale
    label = 14
    rows = ("styled", "flat", "mask")
    grid = Image.new("RGB", (cell * count, (cell + label) * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, i in enumerate(range(start, start + count)):
        scene = sample_scene(i, split)
        r = render_scene(scene)
        pictures = {"styled": r.styled, "flat": r.flat, "mask": np.repeat(r.mask[..., None], 3, axis=2)}
        texts = {"styled": f"{scene.style} style", "flat": scene.object_words, "mask": scene.mask_kind + " mask"}
        for k, row in enumerate(rows):
            img = Image.fromarray(pictures[row]).resize((cell, cell), Image.NEAREST)
            grid.paste(img, (c * cell, k * (cell + label)))
            draw.text((c * cell + 3, k * (cell + label) + cell + 1), texts[row][: cell // 6], fill="black")
    return grid
