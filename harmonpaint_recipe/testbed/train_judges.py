"""Fitting the judges on ground truth: the fidelity classifier, then the harmony judge.

Both see only the world's own renderings (never a model output): the fidelity CNN learns
shape and colour from flat, styled and object-free scenes of the ``judge`` split with blur,
colour-bleed, noise and colour-jitter augmentation (:func:`soften`); the harmony judge is
fitted and calibrated in :mod:`.train_harmony`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from attnctl.errors import ConfigError
from harmonpaint_recipe.testbed import data
from harmonpaint_recipe.testbed.augment import soften
from harmonpaint_recipe.testbed.judges import SHAPE_CLASSES, FidelityJudge, FidelityNet, crop_region, mask_box
from harmonpaint_recipe.testbed.progress import Progress, StageLog, set_lr
from harmonpaint_recipe.testbed.settings import TrainSettings
from harmonpaint_recipe.testbed.train_harmony import fit_harmony
from harmonpaint_recipe.testbed.world import (
    COLOUR_NAMES,
    SHAPES,
    render,
    render_scene,
    sample_scene,
    scene_mask,
)


@dataclass
class JudgePool:
    """Ground-truth images for the fidelity judge, rendered once: flat, styled or object-free."""

    images: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    boxes: list[tuple[int, int, int, int]]
    shapes: torch.Tensor  # [N] index into SHAPE_CLASSES
    colours: torch.Tensor  # [N] index into COLOUR_NAMES, -100 for no object


def judge_pool(count: int, seed: int) -> JudgePool:
    rng = np.random.default_rng(seed)
    images, boxes, shapes, colours = [], [], [], []
    for i in range(count):
        scene = sample_scene(i, "judge")
        u = rng.random()
        mode = "background" if u < 0.15 else ("styled" if u < 0.575 else "flat")
        images.append(render(scene, mode))
        boxes.append(mask_box(scene_mask(scene) > 0))
        shapes.append(SHAPE_CLASSES.index("none") if mode == "background" else SHAPES.index(scene.shape))
        colours.append(-100 if mode == "background" else COLOUR_NAMES.index(scene.colour))
    return JudgePool(data.to_tensor(np.stack(images)), boxes, torch.tensor(shapes), torch.tensor(colours))


def _jitter(box: tuple[int, int, int, int], rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = box
    j = rng.integers(-3, 4, size=4)
    y0, x0 = int(np.clip(y0 + j[0], 0, size - 8)), int(np.clip(x0 + j[2], 0, size - 8))
    return y0, int(np.clip(y1 + j[1], y0 + 8, size)), x0, int(np.clip(x1 + j[3], x0 + 8, size))


def fidelity_accuracy(judge: FidelityJudge, count: int = 600, split: str = "eval",
                      transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, float]:
    """Accuracy (shape and colour both right) on ``count`` ground-truth scenes, per rendering."""
    hits: dict[str, list[bool]] = {"flat": [], "styled": []}
    for start in range(0, count, 50):
        scenes = [sample_scene(i, split) for i in range(start, min(start + 50, count))]
        rendered = [render_scene(s) for s in scenes]
        masks = np.stack([r.mask > 0 for r in rendered])
        for mode in hits:
            images = np.stack([getattr(r, mode) for r in rendered])
            if transform is not None:
                images = transform(images)
            for s, (shape, colour) in zip(scenes, judge.predict(images, masks)):
                hits[mode].append(shape == s.shape and colour == s.colour)
    return {mode: float(np.mean(v)) for mode, v in hits.items()}


def train_fidelity(settings: TrainSettings) -> tuple[FidelityJudge, StageLog]:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    pool = judge_pool(settings.judge_scenes, settings.seed)
    size = pool.images.shape[-1]
    net = FidelityNet()
    opt = torch.optim.AdamW(net.parameters(), lr=settings.judge_lr, weight_decay=1e-4)
    prog = Progress("fidelity", settings.judge_steps, settings.judge_minutes, settings.judge_lr, settings.log_every)
    while not prog.done():
        idx = rng.integers(0, len(pool.boxes), size=settings.judge_batch)
        boxes = [_jitter(pool.boxes[i], rng, size) for i in idx]
        crops = soften(crop_region(pool.images[idx], boxes), rng, gen)
        shape_logits, colour_logits = net(crops)
        loss = F.cross_entropy(shape_logits, pool.shapes[idx]) + F.cross_entropy(
            colour_logits, pool.colours[idx], ignore_index=-100)
        set_lr(opt, prog.lr())
        opt.zero_grad()
        loss.backward()
        opt.step()
        prog.update(loss.item())
    return FidelityJudge(net), prog.finish()


def _current_harmony(path) -> bool:
    """Whether ``path`` holds a harmony judge this version loads (older files held only a calibration)."""
    from harmonpaint_recipe.testbed.harmony import HarmonyJudge

    try:
        HarmonyJudge.load(path)
    except ConfigError:
        return False
    return True


def stage_judges(settings: TrainSettings) -> dict[str, Any]:
    """Fit whichever judge ``out_dir/judges`` lacks (a judge found there, of this version, is kept)."""
    folder = settings.out_dir / "judges"
    fid_path, harm_path = folder / "fidelity.safetensors", folder / "harmony.safetensors"
    report_path = folder / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    if fid_path.is_file() and "fidelity" in report:
        print(f"[fidelity] found in {folder}; skipping", flush=True)
    else:
        fidelity, log = train_fidelity(settings)
        accuracy = fidelity_accuracy(fidelity)
        print(f"[fidelity] held-out accuracy: flat {accuracy['flat']:.3f}, styled {accuracy['styled']:.3f}", flush=True)
        fidelity.save(fid_path)
        report["fidelity"] = {**asdict(log), "accuracy_eval_gt": accuracy}
    if harm_path.is_file() and "harmony" in report and _current_harmony(harm_path):
        print(f"[harmony] found in {folder}; skipping", flush=True)
    else:
        harmony, report["harmony"] = fit_harmony(settings)
        harmony.save(harm_path)
    folder.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report
