"""Metric registry, shared CLIP models, ImageReward unavailability."""

from __future__ import annotations

import sys

import pytest
from PIL import Image

from attnctl.errors import InputError
from harmonpaint_recipe.metrics import METRICS, MetricOptions, Sample, build_metrics, parse_metric_names
from harmonpaint_recipe.metrics.image_reward import ImageRewardMetric


def test_registry_names_and_parsing():
    assert set(METRICS) == {"cs", "cmmd", "as", "ir", "preserve"}
    assert parse_metric_names("cs, cmmd,cs") == ["cs", "cmmd"]
    with pytest.raises(InputError, match="did you mean 'cmmd'"):
        parse_metric_names("cs,cmd")


def test_cs_and_as_share_one_clip_model_cmmd_uses_its_own():
    m = build_metrics(["cs", "as", "cmmd"], MetricOptions(clip_model="a", cmmd_model="b"))
    assert m["cs"].embedder is m["as"].embedder
    assert m["cmmd"].embedder.model_name_or_path == "b"


def test_image_reward_reports_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # import fails as if not installed
    res = ImageRewardMetric().safe_score(Sample(image=Image.new("RGB", (4, 4)), prompt="a cat"))
    assert res.values == {"ir": None}
    assert "image-reward" in res.unavailable["ir"]


def test_image_reward_uses_injected_model():
    class Fake:
        def score(self, prompt, image):
            return -0.5 if prompt == "a cat" else 1.0

    res = ImageRewardMetric(model=Fake()).safe_score(Sample(image=Image.new("RGB", (4, 4)), prompt="a cat"))
    assert res.values == {"ir": -0.5} and res.unavailable == {}


def test_an_unavailable_cmmd_model_names_the_cmmd_option(tmp_path):
    m = build_metrics(["cs", "cmmd"], MetricOptions(clip_model=str(tmp_path / "a"), cmmd_model=str(tmp_path / "b"),
                                                    local_files_only=True))
    sample = Sample(image=Image.new("RGB", (8, 8)), prompt="a cat")
    assert "--clip-model" in m["cs"].safe_score(sample).unavailable["cs"]
    from harmonpaint_recipe.metrics.base import MetricUnavailable

    with pytest.raises(MetricUnavailable, match="--cmmd-model") as err:
        m["cmmd"].embedder.load()
    assert "--clip-model" not in str(err.value)
