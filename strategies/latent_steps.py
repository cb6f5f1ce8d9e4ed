"""How a latent-guidance step turns the loss gradient into a latent update (readings of Eq. 9).

HarmonPaint's Eq. 9 writes the update as ``z <- z - alpha_k * grad_z L_s`` and says nothing
about its scale or where it acts. Two readings are offered besides that one:

``step_rule``
    ``paper``: ``u = alpha_k * g`` (Eq. 9 as written; its size follows the gradient's, which
    depends on the model, the resolution and the loss value).
    ``normalized``: ``u = alpha_k * std(z) * g / rms(g)`` per image, so ``alpha_k`` is the
    RMS latent change in units of the latent's own standard deviation, the same for every
    model and resolution. The RMS is taken where the update acts (inside the mask for
    ``step_region: mask``).

``step_region``
    ``all``: the whole latent (Eq. 9 as written).
    ``mask``: the update is multiplied by the inpainting mask at the latent's resolution,
    given a soft edge of ``mask_edge`` latent cells outside it (``w = max(m, blur(m))``,
    Gaussian blur of that sigma), so the background the user keeps is not moved.

The functions take and return fp32 tensors ``[N, C, h, w]`` (one row per image).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STEP_RULES = ("paper", "normalized")
STEP_REGIONS = ("all", "mask")


def soft_region(mask: torch.Tensor, edge: float) -> torch.Tensor:
    """Update weights ``[N, 1, h, w]`` from binary masks ``[N, 1, h, w]``: 1 inside, a Gaussian
    fall-off of sigma ``edge`` cells outside (``edge == 0``: the hard mask)."""
    import torch
    import torch.nn.functional as F

    mask = mask.float()
    if edge <= 0:
        return mask
    radius = max(1, int(round(3 * edge)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=mask.device)
    kernel = torch.exp(-(t**2) / (2 * edge**2))
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(F.pad(mask, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    blurred = F.conv2d(F.pad(blurred, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return torch.maximum(mask, blurred)


def _rms(x: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
    """Per-image RMS ``[N, 1, 1, 1]`` of ``x`` over all elements, or over those where ``where`` is 1."""
    if where is None:
        return x.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    w = where.expand_as(x)
    return ((x.pow(2) * w).sum(dim=(1, 2, 3), keepdim=True) / w.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1)).sqrt()


def latent_update(grad: torch.Tensor, z: torch.Tensor, alpha: float, rule: str,
                  weights: torch.Tensor | None = None, region: torch.Tensor | None = None) -> torch.Tensor:
    """The update ``u`` (``z_new = z - u``) for gradient ``grad`` at latent ``z``.

    ``weights``: ``soft_region`` of the mask for ``step_region: mask`` (None: everywhere);
    ``region``: the binary mask the normalized rule takes its RMS over (None: everywhere).
    """
    import torch

    direction = grad if weights is None else grad * weights
    if rule == "paper":
        return alpha * direction
    if rule == "normalized":
        scale = z.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        rms = _rms(direction, region)
        # a zero gradient (no masked token at the read grids) moves nothing
        return torch.where(rms > 0, alpha * scale * direction / rms.clamp_min(1e-30), torch.zeros_like(direction))
    raise ValueError(f"unknown step rule '{rule}'; use one of {', '.join(STEP_RULES)}")


def is_fake(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a fake tensor (shapes and dtypes only, as memory and FLOP predictions use)."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def update_stats(update: torch.Tensor, z: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How big the update is inside and outside the (binary, ``[N, 1, h, w]``) mask, as RMS over
    all images in units of the latent's standard deviation, and that standard deviation."""
    std = float(z.std())
    inside = mask.expand_as(update)
    n_in, n_out = float(inside.sum()), float((1 - inside).sum())
    sq = update.pow(2)
    rms_in = (float((sq * inside).sum()) / n_in) ** 0.5 if n_in else 0.0
    rms_out = (float((sq * (1 - inside)).sum()) / n_out) ** 0.5 if n_out else 0.0
    return {"latent_std": std, "update_rms_mask": rms_in / std if std else 0.0,
            "update_rms_outside": rms_out / std if std else 0.0}
