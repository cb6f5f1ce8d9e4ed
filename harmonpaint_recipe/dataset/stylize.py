"""A fast stylizer: transfer color statistics of a style image to a content image.

The paper builds Stylized-COCO with StyleID (a diffusion-based style-injection method that
also transfers texture). This module is a cheap, deterministic **approximation** that only
moves colors: both images go to Reinhard et al.'s decorrelated l-alpha-beta space
(RGB -> LMS -> log10 -> orthogonal decorrelating transform); each channel of the content is
then either shifted/scaled to the style's mean and standard deviation (``mode="stats"``)
or histogram-matched to the style channel (``mode="histogram"``), and converted back.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_RGB2LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LMS2LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]], dtype=np.float64
)
_EPS = 1e-6


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """RGB floats in [0, 1], ``[..., 3]`` -> l-alpha-beta."""
    lms = np.clip(rgb @ _RGB2LMS.T, _EPS, None)
    return np.log10(lms) @ _LMS2LAB.T


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_lab`, clipped to [0, 1]."""
    lms = 10.0 ** (lab @ np.linalg.inv(_LMS2LAB).T)
    return np.clip(lms @ np.linalg.inv(_RGB2LMS).T, 0.0, 1.0)


def _match_histogram(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    # map each value of x to the ref value at the same quantile
    order = np.argsort(x, kind="stable")
    quantiles = (np.arange(x.size) + 0.5) / x.size
    ref_sorted = np.sort(ref)
    ref_q = (np.arange(ref.size) + 0.5) / ref.size
    out = np.empty_like(x)
    out[order] = np.interp(quantiles, ref_q, ref_sorted)
    return out


def stylize(content: Image.Image, style: Image.Image, mode: str = "stats", strength: float = 1.0) -> Image.Image:
    """Return ``content`` recolored with the statistics of ``style`` (same size as ``content``).

    ``strength`` in [0, 1] blends the result with the original in l-alpha-beta space.
    """
    if mode not in ("stats", "histogram"):
        raise ValueError(f"unknown stylize mode '{mode}'; use 'stats' or 'histogram'")
    c = rgb_to_lab(np.asarray(content.convert("RGB"), dtype=np.float64) / 255.0).reshape(-1, 3)
    s = rgb_to_lab(np.asarray(style.convert("RGB"), dtype=np.float64) / 255.0).reshape(-1, 3)
    out = np.empty_like(c)
    for ch in range(3):
        if mode == "stats":
            out[:, ch] = (c[:, ch] - c[:, ch].mean()) / (c[:, ch].std() + _EPS) * s[:, ch].std() + s[:, ch].mean()
        else:
            out[:, ch] = _match_histogram(c[:, ch], s[:, ch])
    out = strength * out + (1.0 - strength) * c
    rgb = lab_to_rgb(out).reshape(content.size[1], content.size[0], 3)
    return Image.fromarray(np.round(rgb * 255.0).astype(np.uint8))
