"""CMMD: identical sets, symmetry, a value computed by hand, and the embedding path."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from harmonpaint_recipe.metrics.clip_embedder import ClipEmbedder
from harmonpaint_recipe.metrics.cmmd import Cmmd, mmd_rbf
from harmonpaint_recipe.metrics.testing import save_tiny_clip


def test_identical_sets_give_zero():
    x = np.random.default_rng(1).normal(size=(5, 8))
    assert mmd_rbf(x, x) == pytest.approx(0.0, abs=1e-12)


def test_symmetric_and_sets_of_different_sizes():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(4, 6)), rng.normal(size=(7, 6)) + 3.0
    assert mmd_rbf(x, y) == pytest.approx(mmd_rbf(y, x), rel=1e-12)
    assert mmd_rbf(x, y) > 0


def test_hand_computed_value():
    # X = {(0,0), (3,4)}, Y = {(0,0)}; sigma = 10 -> k = exp(-d^2 / 200); ||(3,4)||^2 = 25
    x = np.array([[0.0, 0.0], [3.0, 4.0]])
    y = np.array([[0.0, 0.0]])
    e = math.exp(-25 / 200)
    k_xx = (1 + e + e + 1) / 4
    k_yy = 1.0
    k_xy = (1 + e) / 2
    expected = 1000 * (k_xx + k_yy - 2 * k_xy)  # = 500 * (1 - e)
    assert mmd_rbf(x, y) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(500 * (1 - e))


def test_cmmd_embeds_l2_normalized_and_matches_kernel(tmp_path):
    clip = save_tiny_clip(tmp_path / "clip336")
    metric = Cmmd(ClipEmbedder(str(clip), local_files_only=True), batch_size=2)
    rng = np.random.default_rng(3)
    imgs = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(5)]
    emb = metric.embed(imgs)
    assert emb.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    # batching must not change embeddings
    np.testing.assert_allclose(metric.embed(imgs[:1])[0], emb[0], atol=1e-5)
    gen, ref = emb[:2], emb[2:]
    assert metric.compute(gen, ref) == pytest.approx(mmd_rbf(ref, gen))
    assert metric.compute(emb, emb) == pytest.approx(0.0, abs=1e-9)
