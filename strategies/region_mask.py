"""``region_mask``: region-masked self-attention (HarmonPaint's SAMS, Eq. 4-7).

The equations, with ``M`` the binary inpainting mask at the site's grid (1 = inpaint),
flattened row-major, and ``A = softmax(Q K^T / sqrt(d))`` the HW x HW self-attention map::

    M^ = (1 - tau) M + tau / (H W)                              (Eq. 7, soft mask)
    A^ = (M^ M^T + (1 - M^)(1 - M^)^T) ⊙ A                      (Eq. 4-6)
    out = A^ V                       (optionally: each row of A^ divided by its sum)

Fast path: ``W = M^ M^T + (1-M^)(1-M^)^T`` has rank 2, and ``(a b^T ⊙ A) V = a ⊙ (A (b ⊙ V))``,
so the op only returns the two factor pairs ``(M^, M^)`` and ``(1-M^, 1-M^)``; the core's
``AttentionCall.compute`` runs one SDPA call on ``[M^⊙V, (1-M^)⊙V]`` (channels) and adds
``M^ ⊙ out_1 + (1-M^) ⊙ out_2``. That is the same sum as ``A^ V``, reordered: exact, and
no HW x HW tensor exists. Each batch row (both CFG halves) uses its own image's mask;
every head gets the same weights.

The factors cover the site's own (image-token) keys. Keys appended at the site by
key/value ops (e.g. ``kv_bank``) are not image tokens with a mask value; the core gives
them weight 1 (the reweight-op contract): SAMS leaves them unweighted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import attnctl
from attnctl.errors import ConfigError
from attnctl.ops import ReweightOp
from attnctl.params import StrategySpec
from attnctl.sites import SiteTable
from strategies._attention_sites import grid_tokens, self_attention_sites

if TYPE_CHECKING:  # tensors arrive through the call; listing strategies needs no torch
    import torch

    from attnctl.call import AttentionCall

NAME = "region_mask"


@dataclass(frozen=True)
class RegionMaskParams:
    """Parameters of ``region_mask``."""

    sites: str = field(default="self[2:7]", metadata={"help": "self-attention sites to act on (selector)"})
    tau: float = field(default=0.1, metadata={"help": "soft-mask smoothing factor tau in [0, 1] (Eq. 7)"})
    renormalize: bool = field(
        default=False, metadata={"help": "divide each row of the reweighted map by its sum (not in the paper)"}
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"tau must be in [0, 1] (0 = hard mask, 1 = uniform), got {self.tau}")


SPEC = StrategySpec(
    name=NAME,
    summary="region-masked self-attention: reweight A by M^M^T + (1-M^)(1-M^)^T (HarmonPaint SAMS)",
    params=RegionMaskParams,
)


def soft_mask(mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 7: ``M^ = (1 - tau) M + tau / (H W)`` for binary masks ``[R, HW]``."""
    return (1.0 - tau) * mask + tau / mask.shape[-1]


@dataclass(eq=False)
class RegionMaskOp(ReweightOp):
    """Returns the rank-2 factors of ``W = M^ M^T + (1-M^)(1-M^)^T`` for the call's rows."""

    tau: float = field(default=0.1, kw_only=True)

    #: on a joint site the factors weigh the img>img block; text keys keep weight 1
    joint_sites: ClassVar[bool] = True
    #: M^ + (1 - M^) = 1: keys outside the image grid fold into the two terms (no third)
    partition_of_unity: ClassVar[bool] = True

    def factors(self, call: AttentionCall) -> list[tuple[torch.Tensor, torch.Tensor]]:
        grid_tokens(call)  # queries and own keys are this grid's tokens
        return call.memo(("region_mask", self.tau), lambda: self._factors(call.mask()))

    def _factors(self, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        m_hat = soft_mask(mask, self.tau)[:, None, :, None]  # [R, 1, HW, 1] fp32
        return [(m_hat, m_hat), (1.0 - m_hat, 1.0 - m_hat)]


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: RegionMaskParams, sites: SiteTable):
    if spec.name != NAME:
        return None
    where = f"strategies.{instance}"
    return [
        RegionMaskOp(instance, site=site, tau=params.tau, renormalize=params.renormalize)
        for site in self_attention_sites(params.sites, sites, where)
    ]
