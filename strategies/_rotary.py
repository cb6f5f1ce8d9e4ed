"""Rotary position embedding as FLUX applies it: pairs of channels rotated by each token's angles.

diffusers' FLUX attention rotates queries and keys with ``cos``/``sin`` of shape [S, d] where
channels (2i, 2i+1) form one pair: ``x' = x * cos + rot(x) * sin`` with
``rot(x)_(2i, 2i+1) = (-x_(2i+1), x_(2i))``. A rotation's inverse is the rotation by the
negative angles, ``x = x' * cos - rot(x') * sin``, exactly (the pairs are orthogonal).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def _pairs_turned(x: torch.Tensor) -> torch.Tensor:
    import torch

    even, odd = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    return torch.stack([-odd, even], dim=-1).flatten(-2)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (fp64 stays fp64)."""
    import torch

    return x if x.dtype == torch.float64 else x.float()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` [..., N, d] rotated by the angles of ``cos``/``sin`` [N, d] (FLUX's convention), in fp32 or wider."""
    x = _wide(x)
    return x * cos.to(x.dtype) + _pairs_turned(x) * sin.to(x.dtype)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of ``rotate``: ``x`` [..., N, d] rotated back to position 0, in fp32 or wider."""
    x = _wide(x)
    return x * cos.to(x.dtype) - _pairs_turned(x) * sin.to(x.dtype)
