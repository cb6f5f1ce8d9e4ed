"""Common types of the metrics: the sample they score, their result, and the base class."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from PIL import Image


class MetricUnavailable(Exception):
    """Raised by a metric that cannot run here; ``str(exc)`` is the reason shown to the user."""


@dataclass
class Sample:
    """One generated image with what it was made from.

    ``mask`` is an ``H x W`` float array in {0, 1} at the size of ``source``; 1 marks the
    inpainted region.
    """

    image: Image.Image
    prompt: str | None = None
    source: Image.Image | None = None
    mask: np.ndarray | None = None


@dataclass
class MetricResult:
    """Values of one metric on one sample; a ``None`` value has a reason in ``unavailable``."""

    values: dict[str, float | None] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    @classmethod
    def missing(cls, keys: tuple[str, ...], reason: str) -> "MetricResult":
        """All ``keys`` unavailable for the same ``reason``."""
        return cls({k: None for k in keys}, {k: reason for k in keys})


class Metric:
    """Base class. Per-item metrics implement :meth:`score`; set metrics (CMMD) override
    ``per_item = False`` and implement their own set-level API.

    ``keys`` are the column names the metric contributes to the results table.
    """

    name: ClassVar[str] = ""
    keys: ClassVar[tuple[str, ...]] = ()
    per_item: ClassVar[bool] = True

    def load(self) -> None:
        """Load models now; raise :class:`MetricUnavailable` with the reason if impossible."""

    def score(self, sample: Sample) -> MetricResult:  # pragma: no cover - interface
        """Score one sample."""
        raise NotImplementedError

    def safe_score(self, sample: Sample) -> MetricResult:
        """:meth:`score`, turning :class:`MetricUnavailable` into ``None`` values with the reason."""
        try:
            self.load()
            return self.score(sample)
        except MetricUnavailable as exc:
            return MetricResult.missing(self.keys, str(exc))
