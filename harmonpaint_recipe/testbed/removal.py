"""Object removal on the testbed world: Attentive Eraser against stock inpainting, judged.

``run_removal_eval(RemovalSettings(out=...))`` takes ``items`` held-out scenes (split
``eval``) with their object drawn flat, masks the object and asks each method to fill the
mask with an empty prompt (stock SDI also with the prompt naming the background's style,
``in <style> style``). Every output is judged:

- **removed**: the fidelity judge sees no object in the mask (its ``none`` class);
- **harmony**: the harmony judge's score of the region on the input's background (0: it
  continues the background's pattern, 1: a flat paste), which a blank or noisy fill fails;
- **background MAE**: mean absolute error outside the mask against the input (0-255).

Controls that must come out at the ends of each scale: the input itself (the object is still
there: removed ~0 %), the ground-truth background (removed ~100 %, harmony ~0) and uniform
noise in the mask (the fidelity judge may call it "no object"; harmony must not pass it).
Means with 95 % bootstrap intervals over scenes, written to ``removal.md`` / ``removal.json``
with a picture of the first scenes (``removal.png``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from attnctl.errors import InputError
from harmonpaint_recipe.files import atomic_save_image, atomic_write_json, atomic_write_text
from harmonpaint_recipe.testbed.report import bootstrap_ci, cell

#: generating methods: name -> (recipe, prompt template, extra overrides)
METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sdi": ("sdi", "", ()),
    "sdi-style": ("sdi", "in {style} style", ()),
    "attentive-eraser": ("attentive-eraser", "", ()),
}
CONTROLS = ("input", "truth-background", "noise")
LABELS = {
    "sdi": "SDI, empty prompt",
    "sdi-style": "SDI, \"in <style> style\" (the background asked for)",
    "attentive-eraser": "Attentive Eraser, empty prompt",
    "input": "control: the input (object still there)",
    "truth-background": "control: ground-truth background",
    "noise": "control: uniform noise in the mask",
}


@dataclass
class RemovalSettings:
    """What ``attnctl testbed removal`` runs."""

    out: Path
    items: int = 50
    start: int = 0
    mask_kind: str = "shape"
    steps: int | None = None
    seed: int = 0
    bootstrap: int = 2000
    grid_items: int = 6
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(METHODS))

    def check(self) -> None:
        if self.items < 2:
            raise InputError(f"--items must be at least 2 (confidence intervals need several items), got {self.items}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be positive, got {self.steps}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")


def _scenes(settings: RemovalSettings) -> list:
    from harmonpaint_recipe.testbed.world import render, sample_scene, scene_mask

    scenes = []
    for i in range(settings.start, settings.start + settings.items):
        scene = sample_scene(i, "eval", mask_kind=settings.mask_kind, styled=False)
        scenes.append((scene, render(scene, "flat"), render(scene, "background"), scene_mask(scene)))
    return scenes


def _generate(settings: RemovalSettings, scenes: list, log) -> dict[str, list[np.ndarray]]:
    from harmonpaint_recipe.inputs import prepare_inputs
    from harmonpaint_recipe.loading import load_recipe
    from harmonpaint_recipe.model import load_pipeline
    from harmonpaint_recipe.progress import progress
    from harmonpaint_recipe.runner import Runner

    steps = [f"sampler.steps={settings.steps}"] if settings.steps else []
    pipe = load_pipeline(load_recipe("sdi", ["model.pretrained=testbed", "model.device=cpu"]))
    pipe.set_progress_bar_config(disable=True)
    outputs: dict[str, list[np.ndarray]] = {}
    bar = progress(desc="removal", total=len(settings.methods) * len(scenes), unit="image")
    for name in settings.methods:
        recipe, template, extra = METHODS[name]
        with Runner(pipe, load_recipe(recipe, ["model.pretrained=testbed", *steps, *extra])) as runner:
            images = []
            for scene, image, _, mask in scenes:
                inputs = prepare_inputs(Image.fromarray(image), Image.fromarray(mask), warn=False)
                result = runner(inputs, template.format(style=scene.style), seed=settings.seed + scene.seed)
                images.append(np.asarray(result.image.convert("RGB")))
                bar.update(1)
        outputs[name] = images
        log(f"{name}: {len(images)} images")
    bar.close()
    return outputs


def _controls(settings: RemovalSettings, scenes: list) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(settings.seed)
    noise = []
    for _, image, _, mask in scenes:
        filled = image.copy()
        region = mask > 127
        filled[region] = rng.integers(0, 256, size=(int(region.sum()), 3), dtype=np.uint8)
        noise.append(filled)
    return {"input": [s[1] for s in scenes], "truth-background": [s[2] for s in scenes], "noise": noise}


def _score(outputs: dict[str, list[np.ndarray]], scenes: list) -> dict[str, dict[str, np.ndarray]]:
    from harmonpaint_recipe.testbed.metrics import JUDGES_DIR
    from harmonpaint_recipe.testbed.judges import FidelityJudge, HarmonyJudge

    fidelity = FidelityJudge.load(JUDGES_DIR / "fidelity.safetensors")
    harmony = HarmonyJudge.load(JUDGES_DIR / "harmony.safetensors")
    inputs = np.stack([s[1] for s in scenes])
    masks = np.stack([s[3] > 127 for s in scenes])
    scores = {}
    for name, images in outputs.items():
        batch = np.stack(images)
        seen = fidelity.predict(batch, masks)
        outside = ~masks[..., None].repeat(3, axis=-1)
        error = np.abs(batch.astype(np.float64) - inputs) * outside
        scores[name] = {
            "removed": np.array([float(shape == "none") for shape, _ in seen]),
            "harmony": harmony.score_many(batch, masks, inputs),
            "bg_mae": error.sum(axis=(1, 2, 3)) / outside.sum(axis=(1, 2, 3)),
        }
    return scores


def _picture(outputs: dict[str, list[np.ndarray]], scenes: list, columns: list[str], count: int) -> Image.Image:
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


def run_removal_eval(settings: RemovalSettings, log=print) -> Path:
    """Generate, judge and report (see the module docstring); returns ``removal.md``."""
    settings.check()
    out = Path(settings.out)
    started = time.perf_counter()
    scenes = _scenes(settings)
    outputs = {**_generate(settings, scenes, log), **_controls(settings, scenes)}
    scores = _score(outputs, scenes)
    draws = np.random.default_rng(settings.seed).integers(0, len(scenes), size=(settings.bootstrap, len(scenes)))
    stats = {name: {key: bootstrap_ci(values, draws) for key, values in s.items()} for name, s in scores.items()}
    names = [*settings.methods, *CONTROLS]
    steps = settings.steps or "the recipes'"
    lines = [
        f"Object removal on {len(scenes)} held-out testbed scenes (split `eval`, scenes {settings.start}-"
        f"{settings.start + len(scenes) - 1}, the object drawn flat, {settings.mask_kind} masks), "
        f"{steps} DDIM steps, noise seed = scene number + {settings.seed}; "
        f"means with 95 % bootstrap intervals ({settings.bootstrap} resamples); {time.perf_counter() - started:.0f} s.",
        "",
        "| method | removed % ↑ | harmony ↓ | background MAE ↓ |",
        "|---|---|---|---|",
    ]
    for name in names:
        s = stats[name]
        lines.append(f"| {LABELS[name]} | {cell(s['removed'], percent=True)} | {cell(s['harmony'])} | "
                     f"{cell(s['bg_mae'], digits=1)} |")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "removal.md", text)
    atomic_write_json(out / "removal.json", {
        "settings": {"items": len(scenes), "start": settings.start, "mask_kind": settings.mask_kind,
                     "steps": settings.steps, "seed": settings.seed, "bootstrap": settings.bootstrap},
        "methods": {name: {key: {"mean": v[0], "low": v[1], "high": v[2]} for key, v in stats[name].items()}
                    for name in names},
        "per_item": {name: {key: values.tolist() for key, values in scores[name].items()} for name in names},
    })
    atomic_save_image(out / "removal.png",
                      _picture(outputs, scenes, ["input", "truth-background", *settings.methods], settings.grid_items))
    return out / "removal.md"
