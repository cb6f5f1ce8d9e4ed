"""ImageReward (Xu et al., NeurIPS 2023): human-preference reward of an image for its prompt.

Uses the ``image-reward`` package (``import ImageReward``) and its ``ImageReward-v1.0``
checkpoint when both are available. Without them the metric reports itself unavailable
with the reason; it never substitutes another number.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

from harmonpaint_recipe.metrics.base import Metric, MetricResult, MetricUnavailable, Sample

from harmonpaint_recipe.metrics.defaults import DEFAULT_IR_MODEL


class ImageRewardMetric(Metric):
    """Wraps an ImageReward model exposing ``score(prompt, image) -> float``."""

    name: ClassVar[str] = "ir"
    keys: ClassVar[tuple[str, ...]] = ("ir",)

    def __init__(self, model_name_or_path: str = DEFAULT_IR_MODEL, model: Any = None, device: str = "cpu") -> None:
        self.model_name_or_path = model_name_or_path
        self.model = model
        self.device = device
        self._error: str | None = None

    def load(self) -> None:
        if self.model is not None:
            return
        if self._error:
            raise MetricUnavailable(self._error)
        try:
            reward = importlib.import_module("ImageReward")
        except ImportError:
            self._error = "the 'image-reward' package is not installed (pip install image-reward)"
            raise MetricUnavailable(self._error) from None
        try:
            self.model = reward.load(self.model_name_or_path, device=self.device)
        except Exception as exc:  # the package raises assorted errors when weights are missing
            self._error = f"could not load ImageReward model '{self.model_name_or_path}': {exc}"
            raise MetricUnavailable(self._error) from exc

    def score(self, sample: Sample) -> MetricResult:
        if not sample.prompt:
            raise MetricUnavailable("the item has no prompt; ImageReward needs one")
        value = self.model.score(sample.prompt, sample.image)
        if isinstance(value, (list, tuple)):
            value = value[0]
        return MetricResult({"ir": float(value)})
