"""Fitting the harmony judge on ground truth, and calibrating it.

The judge learns one question from rendered examples (:mod:`.harmony_examples`) of the
``judge`` split: does the masked object continue the background's pattern? Every batch is
half styled objects (yes) and half negatives (flat, another style, noise texture, smooth
shading, blurred pattern, blotches of random colours in the object or over the whole mask), with Gaussian noise added as the label allows: over the whole
image for any example, inside the mask for negatives only (a noisy styled object is not
the truth either, so that case is left out rather than labelled). Then the images are
softened the way a decoder softens them (blur, down-up sampling, colour bleed, jitter).
The calibration maps the mean probability of styled and flat scenes of the ``calibrate``
split to 0 and 1, per mask kind. No model output is ever seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harmonpaint_recipe.testbed.augment import soften
from harmonpaint_recipe.testbed.harmony import HarmonyJudge, HarmonyNet, judge_inputs
from harmonpaint_recipe.testbed.harmony_examples import add_noise, render_example
from harmonpaint_recipe.testbed.progress import Progress, StageLog, set_lr
from harmonpaint_recipe.testbed.settings import TrainSettings
from harmonpaint_recipe.testbed.world import (
    MASK_KINDS,
    object_coverage,
    render_scene,
    sample_scene,
    scene_mask,
)

#: share of each negative kind among the negatives (flat most: it is the failure to catch)
NEGATIVE_SHARES = {"flat": 0.3, "wrong_style": 0.15, "noise_texture": 0.1, "smooth": 0.07, "blurred": 0.08,
                   "blotches": 0.15, "blotched_mask": 0.15}
#: Gaussian noise added to training images, in levels of 0-255: up to this sigma
MAX_SIGMA_ALL, MAX_SIGMA_MASK = 24.0, 48.0


@dataclass
class ExamplePool:
    """Rendered examples: per scene a styled (positive) and a negative rendering, with the mask."""

    positives: np.ndarray  # [N, H, W, 3] uint8
    negatives: np.ndarray  # [N, H, W, 3] uint8
    negative_kinds: list[str]
    masks: np.ndarray  # [N, H, W] bool


def example_pool(count: int, seed: int, split: str = "judge") -> ExamplePool:
    """``count`` scenes of ``split``, each rendered styled and as one negative kind."""
    rng = np.random.default_rng(seed)
    kinds = list(NEGATIVE_SHARES)
    shares = np.array([NEGATIVE_SHARES[k] for k in kinds])
    positives, negatives, chosen, masks = [], [], [], []
    for i in range(count):
        scene = sample_scene(i, split)
        coverage = object_coverage(scene)
        kind = str(rng.choice(kinds, p=shares / shares.sum()))
        positives.append(render_example(scene, "styled", rng, coverage))
        negatives.append(render_example(scene, kind, rng, coverage))
        chosen.append(kind)
        masks.append(scene_mask(scene, coverage) > 0)
    return ExamplePool(np.stack(positives), np.stack(negatives), chosen, np.stack(masks))


def training_batch(pool: ExamplePool, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images, masks, labels)``: half positives (label 0), half negatives (label 1), noise added as allowed."""
    idx = rng.integers(0, len(pool.masks), size=size)
    labels = (np.arange(size) % 2).astype(np.float32)
    images = np.where(labels[:, None, None, None] > 0, pool.negatives[idx], pool.positives[idx])
    masks = pool.masks[idx]
    out = []
    for image, mask, label in zip(images, masks, labels):
        u = rng.random()
        if u < 0.35:
            image = add_noise(image, mask, rng.uniform(1, MAX_SIGMA_ALL), "all", rng)
        elif u < 0.7 and label > 0:
            image = add_noise(image, mask, rng.uniform(1, MAX_SIGMA_MASK), "mask", rng)
        out.append(image)
    return np.stack(out), masks, labels


def train_harmony_net(settings: TrainSettings) -> tuple[HarmonyNet, StageLog]:
    """Fit the network on the ``judge`` split (budget: ``harmony_steps`` / ``harmony_minutes``)."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed + 1)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    pool = example_pool(settings.judge_scenes, settings.seed)
    net = HarmonyNet()
    opt = torch.optim.AdamW(net.parameters(), lr=settings.judge_lr, weight_decay=1e-4)
    prog = Progress("harmony", settings.harmony_steps, settings.harmony_minutes, settings.judge_lr, settings.log_every)
    while not prog.done():
        images, masks, labels = training_batch(pool, settings.harmony_batch, rng)
        x, region, background = judge_inputs(images, masks)
        x = soften(x, rng, gen)
        logits = net(x, region, background)
        loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels))
        set_lr(opt, prog.lr())
        opt.zero_grad()
        loss.backward()
        opt.step()
        prog.update(loss.item())
    return net.eval(), prog.finish()


def auc(good: np.ndarray, bad: np.ndarray) -> float:
    """Probability that a random ``bad`` score exceeds a random ``good`` one (ties count half)."""
    good, bad = np.asarray(good)[:, None], np.asarray(bad)[None, :]
    return float((good < bad).mean() + 0.5 * (good == bad).mean())


def calibrate_harmony(judge: HarmonyJudge, scenes: int) -> dict[str, Any]:
    """Normalize ``judge`` on styled and flat scenes of the ``calibrate`` split, per mask kind."""
    report: dict[str, Any] = {"scenes_per_kind": scenes}
    for kind in MASK_KINDS:
        rendered = [render_scene(sample_scene(i, "calibrate", mask_kind=kind)) for i in range(scenes)]
        masks = np.stack([r.mask > 0 for r in rendered])
        raw = {mode: judge.probability(np.stack([getattr(r, mode) for r in rendered]), masks)
               for mode in ("styled", "flat")}
        judge.calibrate(kind, raw["styled"], raw["flat"])
        s, f = judge.calibration[kind]
        styled, flat = (raw["styled"] - s) / (f - s), (raw["flat"] - s) / (f - s)
        report[kind] = {"raw_styled_mean": s, "raw_flat_mean": f, "styled_std": float(styled.std()),
                        "flat_std": float(flat.std()), "auc_flat_vs_styled": auc(styled, flat)}
    return report


def fit_harmony(settings: TrainSettings) -> tuple[HarmonyJudge, dict[str, Any]]:
    """Train and calibrate the harmony judge; returns it with its report."""
    net, log = train_harmony_net(settings)
    judge = HarmonyJudge(net)
    calibration = calibrate_harmony(judge, settings.calibration_scenes)
    for kind in MASK_KINDS:
        c = calibration[kind]
        print(f"[harmony] {kind} masks: raw styled {c['raw_styled_mean']:.4f}, raw flat {c['raw_flat_mean']:.4f}, "
              f"std styled {c['styled_std']:.3f} / flat {c['flat_std']:.3f}, AUC {c['auc_flat_vs_styled']:.3f}", flush=True)
    return judge, {**asdict(log), "calibration": calibration}
