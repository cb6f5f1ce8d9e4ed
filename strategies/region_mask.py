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

Keys appended at the site by key/value ops (stage 0, e.g. ``kv_bank``) are not image
tokens with a mask value; they get factor 1 in both terms, i.e. weight
``M^_q + (1 - M^_q) = 1``: SAMS leaves them unweighted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import attnctl
from attnctl.attention import AttentionCall
from attnctl.errors import ConfigError
from attnctl.ops import ReweightOp
from attnctl.params import StrategySpec
from attnctl.sites import SiteTable
from strategies._attention_sites import grid_tokens, self_attention_sites

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

    def factors(self, call: AttentionCall) -> list[tuple[torch.Tensor, torch.Tensor]]:
        hw = grid_tokens(call)
        extra = call.key.shape[-2] - hw  # keys appended by key/value ops: weight 1
        state, device = call.state, call.query.device
        key = ("region_mask", call.site.level, state.rows, device, self.tau, extra)
        return state.memo(key, lambda: self._factors(state.row_mask(call.site, device), extra))

    def _factors(self, mask: torch.Tensor, extra: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        m_hat = soft_mask(mask, self.tau)  # [R, HW] fp32
        query_side = m_hat[:, None, :, None]  # [R, 1, HW, 1]
        ones = m_hat.new_ones(m_hat.shape[0], extra)
        key_in = torch.cat([m_hat, ones], dim=-1)[:, None, :, None]
        key_out = torch.cat([1.0 - m_hat, ones], dim=-1)[:, None, :, None]
        return [(query_side, key_in), (1.0 - query_side, key_out)]


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
