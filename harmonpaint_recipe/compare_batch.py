"""``attnctl inpaint --manifest M --out-dir D --compare RECIPE``: a second recipe on the same items and seeds.

After the manifest's images are made, the same items run with ``RECIPE`` (same overrides,
same seed per item, read from each image's sidecar) into ``D/compare-<recipe>/``. Then

- ``D/compare.png``: one row per item: the input with the mask outlined, ``RECIPE``'s
  image, the main recipe's image;
- ``D/compare.json``: per item and on average, how much each recipe changed the part of
  the image the user keeps: the mean absolute error outside the mask against the input
  (0-255 levels).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from harmonpaint_recipe.files import atomic_save_image, atomic_write_json
from harmonpaint_recipe.inputs import PreparedInputs
from harmonpaint_recipe.jobs import Job, JobRunner
from harmonpaint_recipe.sidecar import sidecar_path

CELL = 160


def recipe_label(name: str) -> str:
    """A recipe name or YAML path as a short label (a YAML path: its stem)."""
    return Path(name).stem if name.endswith((".yaml", ".yml")) else name


def background_error(image: Image.Image, inputs: PreparedInputs) -> float:
    """Mean absolute error (0-255) between ``image`` and the input over the pixels outside the mask."""
    keep = inputs.mask_array < 0.5
    out = np.asarray(image.convert("RGB"), dtype=np.float64)
    src = np.asarray(inputs.image.convert("RGB"), dtype=np.float64)
    return float(np.abs(out - src)[keep].mean()) if keep.any() else 0.0


def _tile(image: Image.Image) -> Image.Image:
    small = max(image.size) < CELL
    return image.convert("RGB").resize((CELL, CELL), Image.NEAREST if small else Image.LANCZOS)


def _outlined(inputs: PreparedInputs) -> Image.Image:
    arr = np.asarray(inputs.image.convert("RGB")).copy()
    mask = inputs.mask_array >= 0.5
    edge = mask & ~(np.pad(mask, 1)[2:, 1:-1] & np.pad(mask, 1)[:-2, 1:-1] & np.pad(mask, 1)[1:-1, 2:]
                    & np.pad(mask, 1)[1:-1, :-2])
    arr[edge] = (255, 0, 255)
    return Image.fromarray(arr)


def compare_grid(rows: Sequence[tuple[str, PreparedInputs, list[Image.Image]]], labels: Sequence[str]) -> Image.Image:
    """Rows of (name, inputs, images); columns: the input with the mask outlined, then each image."""
    head = 18
    grid = Image.new("RGB", (CELL * (len(labels) + 1), head + CELL * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(["input + mask", *labels]):
        draw.text((c * CELL + 4, 4), label[: CELL // 6], fill="black")
    for r, (name, inputs, images) in enumerate(rows):
        y = head + r * CELL
        for c, image in enumerate([_outlined(inputs), *images]):
            grid.paste(_tile(image), (c * CELL, y))
        draw.text((4, y + CELL - 14), name[: CELL // 6], fill="white")
    return grid


def run_compare(jobs: Sequence[Job], main: JobRunner, other: JobRunner, out_dir: Path,
                progress=lambda items, **_: items) -> dict:
    """Run ``other`` on ``jobs`` with the seeds ``main`` used; write the grid and the errors; return the summary."""
    label = recipe_label(other.recipe_name)
    folder = out_dir / f"compare-{label}"
    rows, errors = [], {main.recipe_name: [], label: []}
    todo = []
    for job in jobs:
        record = json.loads(sidecar_path(job.out).read_text(encoding="utf-8"))
        twin = replace(job, out=folder / job.out.name, seed=int(record["seed"]))
        todo.append((job, twin, other.prepare(twin)))
    for job, twin, inputs in progress(todo, desc=f"compare {label}", unit="image"):
        if not (twin.out.is_file() and sidecar_path(twin.out).is_file()):
            other.run(twin, inputs)
        images = [Image.open(twin.out), Image.open(job.out)]
        errors[label].append(background_error(images[0], inputs))
        errors[main.recipe_name].append(background_error(images[1], inputs))
        rows.append((job.out.stem, inputs, images))
    atomic_save_image(out_dir / "compare.png", compare_grid(rows, [label, recipe_label(main.recipe_name)]))
    means = {name: float(np.mean(v)) for name, v in errors.items()}
    summary = {"recipes": [main.recipe_name, label], "items": [job.out.stem for job in jobs],
               "background_mae": {name: [round(x, 3) for x in v] for name, v in errors.items()},
               "mean_background_mae": means,
               "ratio": means[main.recipe_name] / means[label] if means[label] > 0 else None}
    atomic_write_json(out_dir / "compare.json", summary)
    return summary
