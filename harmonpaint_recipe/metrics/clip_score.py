"""CLIP Score (Hessel et al. 2021) as torchmetrics defines it: ``100 * max(cos(E_I, E_T), 0)``.

Default model: ``openai/clip-vit-large-patch14`` (CLIP ViT-L/14), the torchmetrics default
and the one BrushBench uses. The dataset value is the mean of the per-image scores.
"""

from __future__ import annotations

from typing import ClassVar

from harmonpaint_recipe.metrics.base import Metric, MetricResult, MetricUnavailable, Sample
from harmonpaint_recipe.metrics.clip_embedder import ClipEmbedder, l2_normalize



class ClipScore(Metric):
    """Text-image alignment of the generated image with its prompt."""

    name: ClassVar[str] = "cs"
    keys: ClassVar[tuple[str, ...]] = ("cs",)

    def __init__(self, embedder: ClipEmbedder) -> None:
        self.embedder = embedder

    def load(self) -> None:
        self.embedder.load()

    def score(self, sample: Sample) -> MetricResult:
        if not sample.prompt:
            raise MetricUnavailable("the item has no prompt; CLIP Score needs one")
        img = l2_normalize(self.embedder.image_embeds([sample.image]))
        txt = l2_normalize(self.embedder.text_embeds([sample.prompt]))
        cos = float((img * txt).sum())
        return MetricResult({"cs": 100.0 * max(cos, 0.0)})
