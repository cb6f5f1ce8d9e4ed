"""An example third-party strategy plugin: boost attention to the masked region.

``region_boost`` multiplies the post-softmax weight of every key inside the inpainting
mask by ``gain`` and renormalizes each row:

    A' = normalize_rows(A ⊙ 1 w^T),   w_j = 1 + (gain - 1) M_j

That is a rank-1 reweighting, so it is a ``ReweightOp`` with the single factor pair
``(1, w)`` and ``renormalize=True``; attnctl applies it exactly inside one fused SDPA call.

To ship it as a package, declare the module under the entry-point group::

    [project.entry-points."attnctl.strategies"]
    region_boost = "region_boost_plugin"

and use it from a recipe or config: ``{"strategies": {"boost": {"strategy": "region_boost",
"sites": "self@up", "gain": 2.0}}}``. See docs/writing-strategies.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import attnctl
from attnctl import ReweightOp, StrategySpec, select_sites
from attnctl.errors import ConfigError


@dataclass(frozen=True)
class RegionBoostParams:
    """Parameters of ``region_boost``."""

    sites: str = field(default="self@up", metadata={"help": "self-attention sites to act on (selector)"})
    gain: float = field(default=2.0, metadata={"help": "factor on the weight of masked keys (> 0)"})

    def __post_init__(self) -> None:
        if not self.gain > 0:
            raise ConfigError(f"gain must be > 0, got {self.gain}")


@dataclass(eq=False)
class RegionBoostOp(ReweightOp):
    """W = 1 w^T with w = 1 + (gain - 1) M, rows renormalized."""

    gain: float = field(default=2.0, kw_only=True)

    def factors(self, call: attnctl.AttentionCall) -> list[tuple[torch.Tensor, torch.Tensor]]:
        def compute():
            mask = call.mask()  # [rows, HW] fp32 at this site's grid, 1 = inpaint
            key_weight = (1.0 + (self.gain - 1.0) * mask)[:, None, :, None]  # one weight per own key
            return [(key_weight.new_ones(1, 1, 1, 1), key_weight)]

        # depends only on the grid, the rows (both part of call.memo's key) and gain: once per run
        return call.memo(("region_boost", self.gain), compute)


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    return [StrategySpec("region_boost", "boost attention to keys in the masked region", RegionBoostParams)]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: RegionBoostParams, sites: attnctl.SiteTable):
    if spec.name != "region_boost":
        return None  # not ours: another plugin plans it
    picked = select_sites(params.sites, sites)
    if any(s.kind != "self" for s in picked):
        raise ConfigError(f"strategies.{instance}.sites='{params.sites}' must select self-attention sites only")
    return [RegionBoostOp(instance, site=s, gain=params.gain, renormalize=True) for s in picked]
