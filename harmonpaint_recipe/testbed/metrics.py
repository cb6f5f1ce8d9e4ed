"""The testbed judges as attnctl metrics, so the evaluation runner can score with them."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from harmonpaint_recipe.metrics.base import Metric, MetricResult, MetricUnavailable, Sample
from harmonpaint_recipe.metrics.preservation import psnr_from_mse
from harmonpaint_recipe.testbed.judges import FidelityJudge, HarmonyJudge
from harmonpaint_recipe.testbed.models import WEIGHTS_DIR
from harmonpaint_recipe.testbed.vocab import parse_object

JUDGES_DIR = WEIGHTS_DIR / "judges"


def _arrays(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(sample.image.convert("RGB"))
    if sample.mask is None:
        raise MetricUnavailable("the item has no mask")
    mask = np.asarray(sample.mask) > 0.5
    if mask.shape != image.shape[:2]:
        raise MetricUnavailable(f"mask {mask.shape[1]}x{mask.shape[0]} does not match the image {image.shape[1]}x{image.shape[0]}")
    return image, mask


class FidelityMetric(Metric):
    """1 when the fidelity judge sees the prompt's shape and colour in the mask, else 0;
    ``shape_ok`` and ``colour_ok`` score each attribute alone."""

    name: ClassVar[str] = "fidelity"
    keys: ClassVar[tuple[str, ...]] = ("fidelity", "shape_ok", "colour_ok")

    def __init__(self, judge: FidelityJudge | None = None, path: Path = JUDGES_DIR / "fidelity.safetensors") -> None:
        self.judge, self.path = judge, Path(path)

    def load(self) -> None:
        if self.judge is None:
            self.judge = FidelityJudge.load(self.path)

    def score(self, sample: Sample) -> MetricResult:
        colour, shape = parse_object(sample.prompt or "")
        if colour is None or shape is None:
            raise MetricUnavailable(f"the prompt '{sample.prompt}' names no testbed colour and shape")
        image, mask = _arrays(sample)
        seen_shape, seen_colour = self.judge.predict(image[None], mask[None])[0]
        shape_ok, colour_ok = float(seen_shape == shape), float(seen_colour == colour)
        return MetricResult({"fidelity": shape_ok * colour_ok, "shape_ok": shape_ok, "colour_ok": colour_ok})


class HarmonyMetric(Metric):
    """The harmony judge's calibrated score (0 ~ the background's style, 1 ~ a flat paste).

    ``harmony``: the masked region judged on the input's background (the output's region
    composited onto the input), so an output cannot pass by making its whole picture one
    texture; ``harmony_own``: judged in the output's own picture.
    """

    name: ClassVar[str] = "harmony"
    keys: ClassVar[tuple[str, ...]] = ("harmony", "harmony_own")

    def __init__(self, judge: HarmonyJudge | None = None, path: Path = JUDGES_DIR / "harmony.safetensors") -> None:
        self.judge, self.path = judge, Path(path)

    def load(self) -> None:
        if self.judge is None:
            self.judge = HarmonyJudge.load(self.path)

    def score(self, sample: Sample) -> MetricResult:
        image, mask = _arrays(sample)
        source = None if sample.source is None else np.asarray(sample.source.convert("RGB"))
        if source is not None and source.shape != image.shape:
            raise MetricUnavailable(f"output {image.shape[1]}x{image.shape[0]} and input {source.shape[1]}x{source.shape[0]} differ")
        if source is None:
            raise MetricUnavailable("the item has no input image to judge the region's background by")
        return MetricResult({"harmony": self.judge.score(image, mask, source), "harmony_own": self.judge.score(image, mask)})


class BackgroundMetric(Metric):
    """How well the background the user keeps survives: mean absolute error (0-255 levels)
    and PSNR (dB) between the output and the input image, over the pixels outside the mask."""

    name: ClassVar[str] = "background"
    keys: ClassVar[tuple[str, ...]] = ("bg_mae", "bg_psnr")

    def score(self, sample: Sample) -> MetricResult:
        if sample.source is None:
            raise MetricUnavailable("the item has no source image")
        image, mask = _arrays(sample)
        source = np.asarray(sample.source.convert("RGB"), dtype=np.float64)
        if source.shape != image.shape:
            raise MetricUnavailable(f"output {image.shape[1]}x{image.shape[0]} and input {source.shape[1]}x{source.shape[0]} differ")
        keep = ~mask
        if not keep.any():
            raise MetricUnavailable("the mask covers the whole image; there is no background to compare")
        diff = image.astype(np.float64)[keep] - source[keep]
        return MetricResult({"bg_mae": float(np.abs(diff).mean()), "bg_psnr": psnr_from_mse(float(((diff / 255.0) ** 2).mean()))})
