"""CLIP Score: formula by hand, agreement with torchmetrics, offline loading behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harmonpaint_recipe.metrics.base import Sample
from harmonpaint_recipe.metrics.clip_embedder import ClipEmbedder
from harmonpaint_recipe.metrics.clip_score import ClipScore
from harmonpaint_recipe.metrics.testing import save_tiny_clip

PROMPTS = ["a cat", "an oil painting of a horse", "a red bus on a street", "sketch of a dog", "blue sky"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    # a seed whose random CLIP gives some unclamped scores on these prompts (see the torchmetrics test)
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), seed=3)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in PROMPTS]


class _TensorFeatures(torch.nn.Module):
    """torchmetrics expects tensors from get_*_features; transformers 5 returns ModelOutputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def test_clip_score_matches_hand_formula(clip_dir, images):
    emb = ClipEmbedder(str(clip_dir), local_files_only=True)
    metric = ClipScore(emb)
    emb.load()
    for image, prompt in zip(images, PROMPTS):
        ours = metric.safe_score(Sample(image=image, prompt=prompt)).values["cs"]
        px = emb.processor(images=[image], return_tensors="pt")["pixel_values"]
        ids = emb.processor(text=[prompt], return_tensors="pt")
        with torch.no_grad():
            i = emb.model.get_image_features(pixel_values=px).pooler_output[0].double()
            t = emb.model.get_text_features(**ids).pooler_output[0].double()
        cos = float(i @ t / (i.norm() * t.norm()))
        assert ours == pytest.approx(100 * max(cos, 0.0), abs=1e-4)


def test_clip_score_equals_torchmetrics(clip_dir, images):
    from torchmetrics.multimodal import CLIPScore

    emb = ClipEmbedder(str(clip_dir), local_files_only=True)
    emb.load()
    ours_metric = ClipScore(emb)
    reference = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(emb.model), emb.processor))
    positive = 0
    for image, prompt in zip(images, PROMPTS):
        reference.reset()
        reference.update(torch.from_numpy(np.array(image)).permute(2, 0, 1), prompt)
        expected = float(reference.compute())
        ours = ours_metric.safe_score(Sample(image=image, prompt=prompt)).values["cs"]
        assert ours == pytest.approx(expected, abs=1e-3)
        positive += expected > 0
    assert positive >= 1  # at least one non-clamped value, so the comparison is not all zeros


def test_clip_score_unavailable_offline(tmp_path):
    metric = ClipScore(ClipEmbedder(str(tmp_path / "missing-model"), local_files_only=True))
    result = metric.safe_score(Sample(image=Image.new("RGB", (8, 8)), prompt="a cat"))
    assert result.values == {"cs": None}
    assert "missing-model" in result.unavailable["cs"] and "--clip-model" in result.unavailable["cs"]


def test_clip_score_needs_prompt(clip_dir):
    metric = ClipScore(ClipEmbedder(str(clip_dir), local_files_only=True))
    result = metric.safe_score(Sample(image=Image.new("RGB", (32, 32)), prompt=""))
    assert result.values["cs"] is None and "prompt" in result.unavailable["cs"]
