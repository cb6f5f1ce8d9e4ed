"""Paste the input back outside the mask: the composite inpainting tools make of a generation.

The pipeline re-encodes and decodes the whole image, so even pixels outside the mask change
(the decoder's error, and whatever a latent update moved). ``paste_back`` keeps the user's
pixels there: ``out = source * (1 - w) + generated * w`` with ``w = max(m, blur(m))``, the
binary mask ``m`` widened by a Gaussian fall-off of ``blur`` pixels outside it, so the
generated region is kept whole and its seam is blended (A1111's "only masked" with mask
blur, diffusers' ``apply_overlay``).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from harmonpaint_recipe.metrics.preservation import gaussian_blur_reflect101


def paste_weights(mask: np.ndarray, blur: float) -> np.ndarray:
    """``w`` ``[H, W]`` in [0, 1] from a binary mask ``[H, W]`` (1 = generated region)."""
    m = (np.asarray(mask, dtype=np.float64) >= 0.5).astype(np.float64)
    if blur <= 0:
        return m
    ksize = 2 * math.ceil(3 * blur) + 1
    return np.maximum(m, np.clip(gaussian_blur_reflect101(m, ksize, blur), 0.0, 1.0))


def paste_back(generated: Image.Image, source: Image.Image, mask: np.ndarray, blur: float = 2.0) -> Image.Image:
    """``generated`` inside the mask, ``source`` outside it, blended over a ``blur``-pixel edge."""
    if generated.size != source.size:
        generated = generated.resize(source.size, Image.BICUBIC)
    w = paste_weights(mask, blur)[..., None]
    gen = np.asarray(generated.convert("RGB"), dtype=np.float64)
    src = np.asarray(source.convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.clip(np.round(src * (1 - w) + gen * w), 0, 255).astype(np.uint8))
