"""What the judged recipe comparisons on held-out testbed scenes share (``removal``, ``objects``):
generating each method's images, scoring them with the judges, the report table and a picture.

A method is ``(recipe, prompt template, overrides)``: the template is formatted with the
scene's ``style`` and ``caption`` (``a red circle``). Every image is judged:

- **fidelity**: the fidelity judge's reading of the mask (``seen``: ``(shape, colour)``), from
  which a comparison derives its rates (no object seen, the prompt's object seen);
- **harmony**: the harmony judge's score of the region on the input's background (0: it
  continues the background's pattern, 1: a flat paste);
- **background MAE**: mean absolute error outside the mask against the input (0-255).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
from PIL import Image, ImageDraw

from attnctl.errors import InputError

Method = tuple[str, str, tuple[str, ...]]


@dataclass
class ComparisonSettings:
    """What a judged comparison runs (``methods``: names of the subclass's ``METHODS``; empty: all)."""

    METHODS: ClassVar[dict[str, Method]] = {}

    out: Path
    items: int = 40
    start: int = 0
    mask_kind: str = "shape"
    steps: int | None = None
    seed: int = 0
    bootstrap: int = 2000
    grid_items: int = 6
    methods: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods) or tuple(self.METHODS)

    def check(self) -> None:
        if self.items < 2:
            raise InputError(f"--items must be at least 2 (confidence intervals need several items), got {self.items}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be positive, got {self.steps}")
        unknown = [m for m in self.methods if m not in self.METHODS]
        if unknown:
            raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(self.METHODS)}")


def generate(methods: dict[str, Method], names: tuple[str, ...], scenes: list, steps: int | None, seed: int,
             desc: str, log: Callable[[str], None]) -> dict[str, list[np.ndarray]]:
    """Each method's output per scene; ``scenes`` are ``(scene, input image, mask, ...)`` tuples."""
    from harmonpaint_recipe.inputs import prepare_inputs
    from harmonpaint_recipe.loading import load_recipe
    from harmonpaint_recipe.model import load_pipeline
    from harmonpaint_recipe.progress import progress
    from harmonpaint_recipe.runner import Runner

    step_override = [f"sampler.steps={steps}"] if steps else []
    pipe = load_pipeline(load_recipe("sdi", ["model.pretrained=testbed", "model.device=cpu"]))
    pipe.set_progress_bar_config(disable=True)
    outputs: dict[str, list[np.ndarray]] = {}
    bar = progress(desc=desc, total=len(names) * len(scenes), unit="image")
    for name in names:
        recipe, template, extra = methods[name]
        with Runner(pipe, load_recipe(recipe, ["model.pretrained=testbed", *step_override, *extra])) as runner:
            images = []
            for scene, image, mask, *_ in scenes:
                inputs = prepare_inputs(Image.fromarray(image), Image.fromarray(mask), warn=False)
                prompt = template.format(style=scene.style, caption=scene.caption(with_style=False))
                result = runner(inputs, prompt, seed=seed + scene.seed)
                images.append(np.asarray(result.image.convert("RGB")))
                bar.update(1)
        outputs[name] = images
        log(f"{name}: {len(images)} images")
    bar.close()
    return outputs


def judge(outputs: dict[str, list[np.ndarray]], scenes: list) -> dict[str, dict]:
    """Per method: ``seen`` (the fidelity judge's (shape, colour) per image), ``harmony`` and ``bg_mae`` arrays."""
    from harmonpaint_recipe.testbed.judges import FidelityJudge, HarmonyJudge
    from harmonpaint_recipe.testbed.metrics import JUDGES_DIR

    fidelity = FidelityJudge.load(JUDGES_DIR / "fidelity.safetensors")
    harmony = HarmonyJudge.load(JUDGES_DIR / "harmony.safetensors")
    inputs = np.stack([s[1] for s in scenes])
    masks = np.stack([s[2] > 127 for s in scenes])
    outside = ~masks[..., None].repeat(3, axis=-1)
    judged = {}
    for name, images in outputs.items():
        batch = np.stack(images)
        error = np.abs(batch.astype(np.float64) - inputs) * outside
        judged[name] = {
            "seen": fidelity.predict(batch, masks),
            "harmony": harmony.score_many(batch, masks, inputs),
            "bg_mae": error.sum(axis=(1, 2, 3)) / outside.sum(axis=(1, 2, 3)),
        }
    return judged


def picture(outputs: dict[str, list[np.ndarray]], scenes: list, columns: list[str], count: int) -> Image.Image:
    """The first ``count`` scenes, one column per name (its name on top)."""
    cell_px, label = 96, 30
    count = min(count, len(scenes))
    grid = Image.new("RGB", (cell_px * len(columns), label + cell_px * count), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(columns):
        draw.text((c * cell_px + 2, 2), name, fill="black")
        for r in range(count):
            tile = Image.fromarray(outputs[name][r]).resize((cell_px, cell_px), Image.NEAREST)
            grid.paste(tile, (c * cell_px, label + r * cell_px))
    return grid


def noise_in_masks(scenes: list, seed: int) -> list[np.ndarray]:
    """The control every judge must not pass for the wrong reason: the input with uniform noise in the mask."""
    rng = np.random.default_rng(seed)
    noisy = []
    for _, image, mask, *_ in scenes:
        filled = image.copy()
        region = mask > 127
        filled[region] = rng.integers(0, 256, size=(int(region.sum()), 3), dtype=np.uint8)
        noisy.append(filled)
    return noisy


def write_report(out, stem: str, intro: str, columns: list[tuple[str, str]], names: list[str],
                 labels: dict[str, str], scores: dict[str, dict[str, np.ndarray]], settings: dict,
                 bootstrap: int, seed: int) -> tuple[str, dict]:
    """``<stem>.md`` (a table: one row per name, one column per ``(score key, header)``; the first
    column in percent, ``bg_mae`` to one digit) and ``<stem>.json`` (settings, means with 95 %
    bootstrap intervals, per-item scores). Returns the table's text and the statistics."""
    from harmonpaint_recipe.files import atomic_write_json, atomic_write_text
    from harmonpaint_recipe.testbed.report import bootstrap_ci, cell

    n = len(next(iter(scores.values()))[columns[0][0]])
    draws = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))
    stats = {name: {key: bootstrap_ci(values, draws) for key, values in s.items()} for name, s in scores.items()}
    lines = [intro, "", "| method | " + " | ".join(h for _, h in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names:
        cells = [cell(stats[name][key], percent=True) if i == 0 else
                 cell(stats[name][key], digits=1) if key == "bg_mae" else cell(stats[name][key])
                 for i, (key, _) in enumerate(columns)]
        lines.append(f"| {labels[name]} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out = Path(out)
    atomic_write_text(out / f"{stem}.md", text)
    atomic_write_json(out / f"{stem}.json", {
        "settings": settings,
        "methods": {name: {key: {"mean": v[0], "low": v[1], "high": v[2]} for key, v in stats[name].items()}
                    for name in names},
        "per_item": {name: {key: values.tolist() for key, values in scores[name].items()} for name in names},
    })
    return text, stats
