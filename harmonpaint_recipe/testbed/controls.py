"""Controls of the harmony judge: ground truth altered in ways that must not pass for harmony.

Each control is a rendering of held-out scenes: the styled and flat truths, the flat truth
with Gaussian noise (inside the mask or over the whole image), an object in another style,
and kinds the judge never saw in fitting (the same style with other parameters, uniform
and salt-and-pepper noise). A judge that rewarded texture rather than the background's
pattern would score the noisy flat objects as harmonious; these numbers show it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from harmonpaint_recipe.testbed.harmony import HarmonyJudge
from harmonpaint_recipe.testbed.harmony_examples import add_noise, render_example
from harmonpaint_recipe.testbed.train_harmony import auc
from harmonpaint_recipe.testbed.world import STYLES, Scene, object_coverage, sample_scene, scene_mask

NOISE_SIGMAS = (4, 8, 16, 32)
#: control name -> what it shows (the kinds marked "not in fitting" were never negatives of the judge)
CONTROL_LABELS: dict[str, str] = {
    "styled": "styled truth (the background's pattern continued)",
    "flat": "flat truth (a paste)",
    **{f"flat+noise{s}-mask": f"flat truth + Gaussian noise σ {s} inside the mask" for s in NOISE_SIGMAS},
    **{f"flat+noise{s}-all": f"flat truth + Gaussian noise σ {s} everywhere" for s in NOISE_SIGMAS},
    "styled+noise8-all": "styled truth + Gaussian noise σ 8 everywhere",
    "styled+noise32-all": "styled truth + Gaussian noise σ 32 everywhere",
    "wrong_style": "object in another style's pattern",
    "same_style_other_params": "object in the same style, other parameters (not in fitting)",
    "uniform_noise": "flat truth + uniform noise ±40 inside the mask (not in fitting)",
    "salt_pepper": "flat truth + 15 % salt-and-pepper inside the mask (not in fitting)",
}


@dataclass
class ControlScores:
    """Calibrated harmony per control, per scene; the scenes' styles."""

    scores: dict[str, np.ndarray]
    styles: list[str]

    def summary(self, bootstrap: int = 2000, seed: int = 0) -> dict[str, dict]:
        """Per control: mean and 95% bootstrap CI over scenes, and the mean per background style."""
        n = len(self.styles)
        draws = np.random.default_rng(seed).integers(0, n, size=(bootstrap, n))
        out = {}
        for name, values in self.scores.items():
            means = values[draws].mean(axis=1)
            out[name] = {"mean": float(values.mean()), "low": float(np.percentile(means, 2.5)),
                         "high": float(np.percentile(means, 97.5)),
                         "by_style": {s: float(values[[st == s for st in self.styles]].mean())
                                      for s in STYLES if s in self.styles}}
        out["auc_styled_vs_flat"] = auc(self.scores["styled"], self.scores["flat"])
        return out


def _renderer(kind: str, sigma: float | None = None, where: str | None = None) -> Callable:
    def draw(scene: Scene, coverage: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        image = render_example(scene, kind, rng, coverage)
        return add_noise(image, mask, sigma, where, rng) if sigma else image
    return draw


CONTROLS: dict[str, Callable] = {
    "styled": _renderer("styled"),
    "flat": _renderer("flat"),
    **{f"flat+noise{s}-{w}": _renderer("flat", s, w) for w in ("mask", "all") for s in NOISE_SIGMAS},
    "styled+noise8-all": _renderer("styled", 8, "all"),
    "styled+noise32-all": _renderer("styled", 32, "all"),
    "wrong_style": _renderer("wrong_style"),
    "same_style_other_params": _renderer("same_style_other_params"),
    "uniform_noise": _renderer("uniform_noise"),
    "salt_pepper": _renderer("salt_pepper"),
}


def control_scores(judge: HarmonyJudge, count: int = 100, start: int = 0, split: str = "eval",
                   mask_kind: str | None = "box", seed: int = 0) -> ControlScores:
    """Score every control on scenes ``start .. start+count-1`` of ``split``."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(i, split, mask_kind=mask_kind) for i in range(start, start + count)]
    coverages = [object_coverage(s) for s in scenes]
    masks = np.stack([scene_mask(s, c) > 0 for s, c in zip(scenes, coverages)])
    scores = {}
    for name, draw in CONTROLS.items():
        images = np.stack([draw(s, c, m, rng) for s, c, m in zip(scenes, coverages, masks)])
        scores[name] = judge.score_many(images, masks)
    return ControlScores(scores, [s.style for s in scenes])
