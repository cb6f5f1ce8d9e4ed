"""The Gaussian smoothing kernel of Attend-and-Excite's code, which HD-Painter copied."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def smoothing_kernel(size: int, sigma: float) -> torch.Tensor:
    """Their kernel ``[1, 1, size, size]`` (fp32): the product over both axes of
    ``exp(-((x - mean) / (2 sigma))^2)``, normalized to sum 1 (so the effective standard
    deviation is ``sigma * sqrt(2)``: the ``2 sigma`` is their quirk)."""
    import torch

    x = torch.arange(size, dtype=torch.float32)
    k1 = torch.exp(-(((x - (size - 1) / 2) / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
    k2 = k1[:, None] * k1[None, :]
    return (k2 / k2.sum())[None, None]
