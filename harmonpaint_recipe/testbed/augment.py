"""Softening of ground-truth images the way a decoder softens them, for fitting the judges."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def soften(x: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """Blur or down-up sampling (a quarter each), colour bleed, noise and colour jitter, so
    the judge tolerates the softness of decoded images."""
    n = x.shape[0]
    u = torch.from_numpy(rng.random(n)).float()[:, None, None, None]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    soft = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), scale_factor=2, mode="bilinear")
    x = torch.where(u < 0.25, blur, torch.where(u < 0.5, soft, x))
    # colour bleed: mix in a strongly blurred copy, as a decoder smears object and background
    smear = F.avg_pool2d(F.pad(F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1), (2, 2, 2, 2), mode="replicate"), 5, 1)
    bleed = torch.from_numpy(rng.uniform(0, 0.4, size=(n, 1, 1, 1))).float()
    x = x * (1 - bleed) + smear * bleed
    gain = torch.from_numpy(1 + rng.uniform(-0.1, 0.1, size=(n, 1, 1, 1))).float()
    bias = torch.from_numpy(rng.uniform(-0.06, 0.06, size=(n, 3, 1, 1))).float()
    sigma = torch.from_numpy(rng.uniform(0, 0.06, size=(n, 1, 1, 1))).float()
    return (x * gain + bias + torch.randn(x.shape, generator=gen) * sigma).clamp(-1, 1)
