"""Metric names on the command line -> metric classes, and a builder that shares CLIP models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from attnctl.errors import InputError
from attnctl.registry import Registry
from harmonpaint_recipe.metrics.aesthetic import AestheticScore
from harmonpaint_recipe.metrics.base import Metric
from harmonpaint_recipe.metrics.clip_embedder import ClipEmbedder
from harmonpaint_recipe.metrics.clip_score import ClipScore
from harmonpaint_recipe.metrics.cmmd import Cmmd
from harmonpaint_recipe.metrics.defaults import DEFAULT_CLIP_MODEL, DEFAULT_CMMD_MODEL, DEFAULT_IR_MODEL
from harmonpaint_recipe.metrics.image_reward import ImageRewardMetric
from harmonpaint_recipe.metrics.preservation import Preservation

METRICS: Registry[type[Metric]] = Registry("metric", {
    "cs": ClipScore,
    "cmmd": Cmmd,
    "as": AestheticScore,
    "ir": ImageRewardMetric,
    "preserve": Preservation,
}, error=InputError)


@dataclass
class MetricOptions:
    """Where each metric finds its model. ``clip_model`` serves CS and AS (ViT-L/14)."""

    clip_model: str = DEFAULT_CLIP_MODEL
    cmmd_model: str = DEFAULT_CMMD_MODEL
    aesthetic_head: str | None = None
    ir_model: str = DEFAULT_IR_MODEL
    preserve_mode: str = "standard"
    lpips: bool = False
    local_files_only: bool = False
    device: str = "cpu"


def parse_metric_names(text: str | Iterable[str]) -> list[str]:
    """``"cs,cmmd"`` -> ``["cs", "cmmd"]``; unknown names raise :class:`InputError`."""
    return METRICS.parse_list(text, "--metrics")


def build_metrics(names: Iterable[str], options: MetricOptions | None = None) -> dict[str, Metric]:
    """Instantiate the named metrics; metrics using the same CLIP checkpoint share one model."""
    options = options or MetricOptions()
    embedders: dict[str, ClipEmbedder] = {}

    def embedder(model: str, option: str) -> ClipEmbedder:
        if model not in embedders:
            embedders[model] = ClipEmbedder(model, local_files_only=options.local_files_only, device=options.device,
                                            options=(option,))
        elif option not in embedders[model].options:
            embedders[model].options.append(option)
        return embedders[model]

    built: dict[str, Metric] = {}
    for name in parse_metric_names(list(names)):
        if name == "cs":
            built[name] = ClipScore(embedder(options.clip_model, "--clip-model"))
        elif name == "cmmd":
            built[name] = Cmmd(embedder(options.cmmd_model, "--cmmd-model"))
        elif name == "as":
            built[name] = AestheticScore(embedder(options.clip_model, "--clip-model"), head_path=options.aesthetic_head)
        elif name == "ir":
            built[name] = ImageRewardMetric(options.ir_model, device=options.device)
        else:
            built[name] = Preservation(options.preserve_mode, local_files_only=options.local_files_only,
                                       with_lpips=options.lpips)
    return built
