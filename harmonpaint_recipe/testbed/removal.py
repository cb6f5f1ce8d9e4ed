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
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from harmonpaint_recipe.files import atomic_save_image
from harmonpaint_recipe.testbed.judged import (ComparisonSettings, Method, generate, judge, noise_in_masks, picture,
                                               write_report)

#: generating methods: name -> (recipe, prompt template, extra overrides)
METHODS: dict[str, Method] = {
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
class RemovalSettings(ComparisonSettings):
    """What ``attnctl testbed removal`` runs."""

    METHODS: ClassVar[dict[str, Method]] = METHODS
    items: int = 50


def _scenes(settings: RemovalSettings) -> list:
    from harmonpaint_recipe.testbed.world import render, sample_scene, scene_mask

    scenes = []
    for i in range(settings.start, settings.start + settings.items):
        scene = sample_scene(i, "eval", mask_kind=settings.mask_kind, styled=False)
        scenes.append((scene, render(scene, "flat"), scene_mask(scene), render(scene, "background")))
    return scenes


def _controls(settings: RemovalSettings, scenes: list) -> dict[str, list[np.ndarray]]:
    return {"input": [s[1] for s in scenes], "truth-background": [s[3] for s in scenes],
            "noise": noise_in_masks(scenes, settings.seed)}


def _score(outputs: dict[str, list[np.ndarray]], scenes: list) -> dict[str, dict[str, np.ndarray]]:
    return {name: {"removed": np.array([float(shape == "none") for shape, _ in j["seen"]]),
                   "harmony": j["harmony"], "bg_mae": j["bg_mae"]}
            for name, j in judge(outputs, scenes).items()}


def run_removal_eval(settings: RemovalSettings, log=print) -> Path:
    """Generate, judge and report (see the module docstring); returns ``removal.md``."""
    settings.check()
    out = Path(settings.out)
    started = time.perf_counter()
    scenes = _scenes(settings)
    generated = generate(METHODS, settings.methods, scenes, settings.steps, settings.seed, "removal", log)
    outputs = {**generated, **_controls(settings, scenes)}
    scores = _score(outputs, scenes)
    names = [*settings.methods, *CONTROLS]
    steps = settings.steps or "the recipes'"
    intro = (
        f"Object removal on {len(scenes)} held-out testbed scenes (split `eval`, scenes {settings.start}-"
        f"{settings.start + len(scenes) - 1}, the object drawn flat, {settings.mask_kind} masks), "
        f"{steps} DDIM steps, noise seed = scene number + {settings.seed}; "
        f"means with 95 % bootstrap intervals ({settings.bootstrap} resamples); {time.perf_counter() - started:.0f} s."
    )
    settings_json = {"items": len(scenes), "start": settings.start, "mask_kind": settings.mask_kind,
                     "steps": settings.steps, "seed": settings.seed, "bootstrap": settings.bootstrap}
    columns = [("removed", "removed % ↑"), ("harmony", "harmony ↓"), ("bg_mae", "background MAE ↓")]
    write_report(out, "removal", intro, columns, names, LABELS, scores, settings_json, settings.bootstrap, settings.seed)
    atomic_save_image(out / "removal.png",
                      picture(outputs, scenes, ["input", "truth-background", *settings.methods], settings.grid_items))
    return out / "removal.md"
