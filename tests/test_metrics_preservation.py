"""Unmasked-region preservation: MSE/PSNR by hand, mask handling, BrushBench mode."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from harmonpaint_recipe.metrics.base import Sample
from harmonpaint_recipe.metrics.preservation import Preservation, brushbench_blend, gaussian_blur_reflect101


def _img(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a.astype(np.uint8))


def test_mse_psnr_only_over_unmasked_pixels():
    src = np.full((8, 8, 3), 100, np.uint8)
    gen = src.copy()
    mask = np.zeros((8, 8))
    mask[:4] = 1
    gen[:4] = 0  # changes inside the mask must not count
    gen[4:, :, 0] = 151  # +51 on channel 0 of every unmasked pixel
    res = Preservation(local_files_only=True).safe_score(Sample(image=_img(gen), source=_img(src), mask=mask))
    expected_mse = (51 / 255) ** 2 / 3  # one channel of three differs
    assert res.values["mse"] == pytest.approx(expected_mse, rel=1e-9)
    assert res.values["psnr"] == pytest.approx(10 * math.log10(1 / expected_mse), rel=1e-9)
    assert "lpips" not in res.values  # opt-in
    asked = Preservation(local_files_only=True, with_lpips=True).safe_score(Sample(image=_img(gen), source=_img(src), mask=mask))
    assert asked.values["lpips"] is None and "local-files-only" in asked.unavailable["lpips"]


def test_identical_unmasked_region_caps_psnr_and_full_mask_is_unavailable():
    src = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    mask = np.zeros((8, 8))
    mask[2:5, 2:5] = 1
    gen = src.copy()
    gen[2:5, 2:5] = 0
    res = Preservation(local_files_only=True).safe_score(Sample(image=_img(gen), source=_img(src), mask=mask))
    assert res.values["mse"] == 0.0 and res.values["psnr"] == 100.0
    full = Preservation(local_files_only=True).safe_score(Sample(image=_img(gen), source=_img(src), mask=np.ones((8, 8))))
    assert full.values == {"mse": None, "psnr": None}
    assert "whole image" in full.unavailable["mse"]


def test_injected_lpips_sees_masked_region_zeroed():
    seen = {}

    def fake_lpips(a, b):
        seen["a"], seen["b"] = a, b
        return torch.tensor(0.25)

    src = np.full((4, 4, 3), 255, np.uint8)
    mask = np.zeros((4, 4))
    mask[0, 0] = 1
    res = Preservation(lpips=fake_lpips).safe_score(Sample(image=_img(src), source=_img(src), mask=mask))
    assert res.values["lpips"] == 0.25
    # masked pixel set to 0 in [0, 1] (BrushBench order), i.e. -1 after scaling to [-1, 1]
    assert seen["a"][0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert seen["b"][0, :, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert float(seen["b"][0, 0, 1, 1]) == 1.0


def test_gaussian_blur_kernel_and_border():
    x = np.zeros((41, 41))
    x[20, 20] = 1.0
    y = gaussian_blur_reflect101(x)
    t = np.arange(-10, 11)
    k = np.exp(-(t**2) / (2 * 3.5**2))
    k /= k.sum()
    assert y[20, 20] == pytest.approx(k[10] ** 2)
    assert y.sum() == pytest.approx(1.0)
    const = gaussian_blur_reflect101(np.full((5, 7), 3.0))  # border handling keeps constants
    np.testing.assert_allclose(const, 3.0)


def test_brushbench_mode_formula():
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, (512, 512, 3)).astype(np.uint8)
    gen = rng.integers(0, 256, (512, 512, 3)).astype(np.uint8)
    mask = np.zeros((512, 512))
    mask[100:300, 150:400] = 1
    res = Preservation("brushbench", local_files_only=True).safe_score(Sample(image=_img(gen), source=_img(src), mask=mask))
    pasted = brushbench_blend(gen / 255.0, src / 255.0, mask)
    keep = (1 - mask)[..., None]
    mse_bb = (((pasted - src / 255.0) * keep) ** 2).sum() / keep.sum()
    assert res.values["mse"] == pytest.approx(mse_bb, rel=1e-9)
    assert res.values["psnr"] == pytest.approx(20 * math.log10(1 / math.sqrt(mse_bb)), rel=1e-9)
    # far from the mask the paste restores the source exactly
    np.testing.assert_array_equal(pasted[:50], src[:50] / 255.0)
    assert mse_bb > 0  # the blur leaks generated pixels just outside the mask
