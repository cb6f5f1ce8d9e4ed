"""Object prompts on the testbed world: HD-Painter against stock inpainting, judged.

``run_objects_eval(ObjectsSettings(out=...))`` takes ``items`` held-out scenes (split
``eval``), shows each method the scene's background with the object's mask and asks for the
object by its caption (``a red circle``; the ``-style`` methods add ``in <style> style``, the
background's style, which the testbed model was trained to draw in). Every output is judged (``attnctl.testbed.judged``):

- **object**: the fidelity judge sees the prompt's shape and colour in the mask;
- **harmony**: 0 when the region continues the background's pattern, 1 for a flat paste;
- **background MAE**: error outside the mask against the input (0-255).

Controls at the ends of each scale: the ground truth with the object in the background's
style (object ~100 %, harmony low), the object pasted flat (object ~100 %, harmony ~1), the
background alone (object 0 %) and uniform noise in the mask (the object judge must fail it).
Means with 95 % bootstrap intervals over scenes, written to ``objects.md`` / ``objects.json``
with a picture of the first scenes (``objects.png``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from harmonpaint_recipe.files import atomic_save_image
from harmonpaint_recipe.testbed.judged import ComparisonSettings, Method, generate, judge, noise_in_masks, picture, write_report

#: the testbed's toy vocabulary has none of HD-Painter's quality and negative words
_NO_WORDS = ("sampler.negative_prompt=null", "sampler.positive_prompt=null")
METHODS: dict[str, Method] = {
    "sdi": ("sdi", "{caption}", ()),
    "hd-painter": ("hd-painter", "{caption}", ()),
    "hd-painter-no-words": ("hd-painter", "{caption}", _NO_WORDS),
    "painta": ("hd-painter", "{caption}", (*_NO_WORDS, "strategies.hd.rasg=false")),
    "rasg": ("hd-painter", "{caption}", (*_NO_WORDS, "strategies.hd.painta=false")),
    "sdi-style": ("sdi", "{caption} in {style} style", ()),
    "hd-painter-style": ("hd-painter", "{caption} in {style} style", _NO_WORDS),
}
CONTROLS = ("truth", "flat-paste", "background", "noise")
LABELS = {
    "sdi": "SDI",
    "hd-painter": "HD-Painter (recipe as shipped: their quality and negative words)",
    "hd-painter-no-words": "HD-Painter without those words",
    "painta": "PAIntA alone (no words)",
    "rasg": "RASG alone (no words)",
    "sdi-style": "SDI, \"<caption> in <style> style\"",
    "hd-painter-style": "HD-Painter (no words), \"<caption> in <style> style\"",
    "truth": "control: ground truth (object in the background's style)",
    "flat-paste": "control: the object pasted flat",
    "background": "control: the background alone (no object)",
    "noise": "control: uniform noise in the mask",
}


@dataclass
class ObjectsSettings(ComparisonSettings):
    """What ``attnctl testbed objects`` runs."""

    METHODS: ClassVar[dict[str, Method]] = METHODS
    items: int = 40


def _scenes(settings: ObjectsSettings) -> list:
    """(scene, background input, mask, styled truth, flat paste) per held-out scene."""
    from harmonpaint_recipe.testbed.world import render, sample_scene, scene_mask

    scenes = []
    for i in range(settings.start, settings.start + settings.items):
        scene = sample_scene(i, "eval", mask_kind=settings.mask_kind)
        scenes.append((scene, render(scene, "background"), scene_mask(scene), render(scene, "styled"),
                       render(scene, "flat")))
    return scenes


def _score(outputs: dict[str, list[np.ndarray]], scenes: list) -> dict[str, dict[str, np.ndarray]]:
    wanted = [(s[0].shape, s[0].colour) for s in scenes]
    return {name: {"object": np.array([float(tuple(seen) == want) for seen, want in zip(j["seen"], wanted)]),
                   "harmony": j["harmony"], "bg_mae": j["bg_mae"]}
            for name, j in judge(outputs, scenes).items()}


def run_objects_eval(settings: ObjectsSettings, log=print) -> Path:
    """Generate, judge and report (see the module docstring); returns ``objects.md``."""
    settings.check()
    out = Path(settings.out)
    started = time.perf_counter()
    scenes = _scenes(settings)
    generated = generate(METHODS, settings.methods, scenes, settings.steps, settings.seed, "objects", log)
    controls = {"truth": [s[3] for s in scenes], "flat-paste": [s[4] for s in scenes],
                "background": [s[1] for s in scenes], "noise": noise_in_masks(scenes, settings.seed)}
    outputs = {**generated, **controls}
    scores = _score(outputs, scenes)
    names = [*settings.methods, *CONTROLS]
    steps = settings.steps or "the recipes'"
    intro = (
        f"Object prompts on {len(scenes)} held-out testbed scenes (split `eval`, scenes {settings.start}-"
        f"{settings.start + len(scenes) - 1}, {settings.mask_kind} masks, the background as input, the caption "
        f"as prompt), {steps} DDIM steps, noise seed = scene number + {settings.seed}; "
        f"means with 95 % bootstrap intervals ({settings.bootstrap} resamples); {time.perf_counter() - started:.0f} s."
    )
    settings_json = {"items": len(scenes), "start": settings.start, "mask_kind": settings.mask_kind,
                     "steps": settings.steps, "seed": settings.seed, "bootstrap": settings.bootstrap}
    columns = [("object", "object seen % ↑"), ("harmony", "harmony ↓"), ("bg_mae", "background MAE ↓")]
    write_report(out, "objects", intro, columns, names, LABELS, scores, settings_json, settings.bootstrap, settings.seed)
    atomic_save_image(out / "objects.png",
                      picture(outputs, scenes, ["background", "truth", *settings.methods], settings.grid_items))
    return out / "objects.md"
