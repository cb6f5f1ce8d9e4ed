"""Fitting the judges on ground truth: the fidelity classifier and the harmony calibration.

Both see only the world's own renderings (never a model output): the fidelity CNN learns
shape and colour from flat, styled and object-free scenes of the ``judge`` split with blur,
colour-bleed, noise and colour-jitter augmentation; the harmony judge is normalized on
styled and flat scenes of the ``calibrate`` split, per mask kind.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from harmonpaint_recipe.testbed import data
from harmonpaint_recipe.testbed.judges import (
    SHAPE_CLASSES,
    FidelityJudge,
    FidelityNet,
    HarmonyJudge,
    crop_region,
    mask_box,
)
from harmonpaint_recipe.testbed.progress import Progress, StageLog, set_lr
from harmonpaint_recipe.testbed.settings import TrainSettings
from harmonpaint_recipe.testbed.world import COLOUR_NAMES, MASK_KINDS, SHAPES, render, render_scene, sample_scene, scene_mask


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


def _augment(x: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """Blur or down-up sampling (a quarter each), colour bleed, noise and colour jitter, so
    the judge tolerates the softness of decoded images."""
    n = x.shape[0]
    u = torch.from_numpy(rng.random(n)).float()[:, None, None, None]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    soft = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), scale_factor=2, mode="bilinear")
    x = torch.where(u < 0.25, blur, torch.where(u < 0.5, soft, x))
    # colour bleed: mix in a strongly blurred copy, as a decoder smears object and background
    smear = F.avg_pool2d(F.pad(F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1), (2, 2, 2, 2), mode="replicate"), 5, 1)
    bleed = torch.from_numpy(rng.uniform(0, 0.4, size=(n, 1, 1, 1))).float()
    x = x * (1 - bleed) + smear * bleed
    gain = torch.from_numpy(1 + rng.uniform(-0.1, 0.1, size=(n, 1, 1, 1))).float()
    bias = torch.from_numpy(rng.uniform(-0.06, 0.06, size=(n, 3, 1, 1))).float()
    sigma = torch.from_numpy(rng.uniform(0, 0.06, size=(n, 1, 1, 1))).float()
    return (x * gain + bias + torch.randn(x.shape, generator=gen) * sigma).clamp(-1, 1)


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
        crops = _augment(crop_region(pool.images[idx], boxes), rng, gen)
        shape_logits, colour_logits = net(crops)
        loss = F.cross_entropy(shape_logits, pool.shapes[idx]) + F.cross_entropy(
            colour_logits, pool.colours[idx], ignore_index=-100)
        set_lr(opt, prog.lr())
        opt.zero_grad()
        loss.backward()
        opt.step()
        prog.update(loss.item())
    return FidelityJudge(net), prog.finish()


def calibrate_harmony(settings: TrainSettings) -> tuple[HarmonyJudge, dict[str, Any]]:
    """Normalize the harmony judge on styled and flat ground-truth scenes, per mask kind."""
    judge = HarmonyJudge()
    report: dict[str, Any] = {"scenes_per_kind": settings.calibration_scenes}
    for kind in MASK_KINDS:
        raw: dict[str, list[float]] = {"styled": [], "flat": []}
        for i in range(settings.calibration_scenes):
            r = render_scene(sample_scene(i, "calibrate", mask_kind=kind))
            for mode in raw:
                raw[mode].append(judge.distance(getattr(r, mode), r.mask > 0))
        judge.calibrate(kind, np.array(raw["styled"]), np.array(raw["flat"]))
        s, f = judge.calibration[kind]
        styled = (np.array(raw["styled"]) - s) / (f - s)
        flat = (np.array(raw["flat"]) - s) / (f - s)
        auc = float((styled[:, None] < flat[None, :]).mean() + 0.5 * (styled[:, None] == flat[None, :]).mean())
        report[kind] = {"raw_styled_mean": s, "raw_flat_mean": f, "styled_std": float(styled.std()),
                        "flat_std": float(flat.std()), "auc_flat_vs_styled": auc}
    return judge, report


def stage_judges(settings: TrainSettings) -> dict[str, Any]:
    folder = settings.out_dir / "judges"
    fid_path, harm_path = folder / "fidelity.safetensors", folder / "harmony.safetensors"
    report_path = folder / "report.json"
    if fid_path.is_file() and harm_path.is_file() and report_path.is_file():
        print(f"[judges] found in {folder}; skipping", flush=True)
        return json.loads(report_path.read_text(encoding="utf-8"))
    fidelity, log = train_fidelity(settings)
    accuracy = fidelity_accuracy(fidelity)
    print(f"[fidelity] held-out accuracy: flat {accuracy['flat']:.3f}, styled {accuracy['styled']:.3f}", flush=True)
    harmony, calib = calibrate_harmony(settings)
    for kind in MASK_KINDS:
        c = calib[kind]
        print(f"[harmony] {kind} masks: raw styled {c['raw_styled_mean']:.4f}, raw flat {c['raw_flat_mean']:.4f}, "
              f"normalized std styled {c['styled_std']:.3f} / flat {c['flat_std']:.3f}, AUC {c['auc_flat_vs_styled']:.3f}",
              flush=True)
    fidelity.save(fid_path)
    harmony.save(harm_path)
    report = {"fidelity": {**asdict(log), "accuracy_eval_gt": accuracy}, "harmony": calib}
    report_path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report
