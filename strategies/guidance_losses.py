"""Losses for cross-attention latent guidance, registered by name.

A loss sees the cross-attention maps of one token grid (averaged over heads and over the
read sites of that grid) and returns one value per image. ``latent_guidance`` averages
the per-grid values over grids. Everything here runs in fp32.

Built-ins:

- ``steer``: HarmonPaint's Attention Steer Loss (Eq. 8-9, read as in
  docs/harmonpaint.md);
- ``attend_excite``: Attend-and-Excite's loss (Chefer et al. 2023), restricted to the
  inpainting mask.

Add one with ``@register_loss("name")`` on a function ``(GridMaps) -> Tensor[B]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from attnctl.registry import Registry
from strategies._smoothing import smoothing_kernel

if TYPE_CHECKING:
    import torch

# torch is imported inside the losses: validating a recipe (``loss: steer``) needs no torch


@dataclass(frozen=True)
class GridMaps:
    """Everything a loss needs about one token grid of one guidance pass.

    Attributes:
        probs: [B, H*W, L] fp32 cross-attention probabilities (L = 77 text positions),
            averaged over heads and over the read sites of this grid.
        mask: [B, H*W] binary fp32 inpainting mask M_f at this grid (1 = inpaint).
        grid: (H, W).
        tokens: [B, L] bool, the text positions the loss is about (never position 0).
        token_scale: factor on the probabilities before the token softmax (100).
        eps: the epsilon of the loss.
    """

    probs: torch.Tensor
    mask: torch.Tensor
    grid: tuple[int, int]
    tokens: torch.Tensor
    token_scale: float
    eps: float


LossFn = Callable[[GridMaps], "torch.Tensor"]
#: guidance losses by name (``loss: steer`` in a recipe)
LOSSES: Registry[LossFn] = Registry("guidance loss")


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Register ``fn`` as the guidance loss ``name`` (usable as ``loss: name``)."""
    return LOSSES.register(name)


def get_loss(name: str) -> LossFn:
    """The loss registered as ``name``; ``ConfigError`` listing the known ones otherwise."""
    return LOSSES.get(name, "loss")


def renormalize_tokens(probs: torch.Tensor, token_scale: float) -> torch.Tensor:
    """Drop the start token (column 0), scale the rest, softmax over tokens.

    Returns [B, HW, L-1]; **column c is text position c + 1**.
    """
    import torch

    return torch.softmax(probs[..., 1:].float() * token_scale, dim=-1)


# --------------------------------------------------------------------- Attention Steer Loss
def _log_one_minus(a: torch.Tensor, eps: float) -> torch.Tensor:
    """log(1 - A + eps) over the token axis, accurate in fp32 at both ends.

    For small A, ``log1p(eps - A)`` keeps full relative precision. Only the largest entry
    of a patch can be close to 1 (the row sums to 1); there ``1 - A`` is computed as the
    sum of the other entries, which has no cancellation. Both are the same function of
    the logits, so values and gradients are those of the literal formula.
    """
    import torch

    top = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, a.argmax(dim=-1, keepdim=True), True)
    rest = a.masked_fill(top, 0.0).sum(dim=-1, keepdim=True)  # = 1 - A_top
    return torch.where(top, torch.log(rest + eps), torch.log1p(eps - a))


@register_loss("steer")
def steer_loss(g: GridMaps) -> torch.Tensor:
    """Attention Steer Loss of one grid, per image: sum over tokens i of L_i.

    S_i = sum_j M_f(j) log(1 - A_ij + eps) / (H W)   (log of prod_j (1 - A^_ij), Eq. 8-9)
    L_i = -log(1 - exp(S_i)) = -log(-expm1(S_i))

    Two guards keep it finite. ``1 - exp(S_i)`` is floored at ``eps``: with ``eps`` inside
    the log, S_i can reach slightly above 0 when a token has (almost) no attention in the
    region, where the literal formula gives inf/NaN; the floor caps L_i at -log(eps) there.
    An image whose mask has no token at this grid contributes 0 (and zero gradient).
    """
    import torch

    a = renormalize_tokens(g.probs, g.token_scale)  # [B, HW, L-1]
    h, w = g.grid
    s = (g.mask[..., None] * _log_one_minus(a, g.eps)).sum(dim=1) / (h * w)  # [B, L-1]
    per_token = -torch.log((-torch.expm1(s)).clamp_min(g.eps))
    loss = (per_token * g.tokens[:, 1:]).sum(dim=1)
    has_region = g.mask.sum(dim=1) > 0
    return torch.where(has_region, loss, torch.zeros_like(loss))


# --------------------------------------------------------------------- Attend-and-Excite
@register_loss("attend_excite")
def attend_excite_loss(g: GridMaps) -> torch.Tensor:
    """Attend-and-Excite's loss of one grid, per image: max over tokens of (1 - max_j A_ij)+.

    As in their implementation: drop the start token, x100, softmax over tokens, smooth
    each token's map with their 3x3 Gaussian (reflect padding), take its maximum. For
    inpainting the maximum is taken over the masked patches only. Images without masked
    patches at this grid, or without selected tokens, contribute 0.
    """
    import torch
    import torch.nn.functional as F

    a = renormalize_tokens(g.probs, g.token_scale)  # [B, HW, L-1]
    b, _, n = a.shape
    h, w = g.grid
    maps = a.transpose(1, 2).reshape(b * n, 1, h, w)
    mode = "reflect" if min(h, w) >= 2 else "replicate"
    smoothed = F.conv2d(F.pad(maps, (1, 1, 1, 1), mode=mode), smoothing_kernel(3, 0.5).to(a.device)).reshape(b, n, h * w)
    # attention is >= 0, so zeroing unmasked patches leaves the max over masked ones
    peak = (smoothed * g.mask[:, None, :]).amax(dim=2)  # [B, L-1]
    per_token = (1.0 - peak).clamp_min(0.0) * g.tokens[:, 1:]
    loss = per_token.amax(dim=1)
    has_region = g.mask.sum(dim=1) > 0
    return torch.where(has_region, loss, torch.zeros_like(loss))
