"""Operations a strategy plans at attach time.

A strategy's plan is a list of ops. Site ops act inside one attention call, in three
stages that always run in this order, whatever order strategies were registered in:

1. ``KeyValueOp.extend``  - append keys/values (and their additive biases);
2. ``ReweightOp.factors`` - post-softmax reweighting ``A <- (sum_r a_r b_r^T) * A`` given
   as low-rank factors, applied exactly with fused attention on scaled values;
3. ``ObserveOp.observe``  - read the attention probabilities (forces an explicit softmax
   at that site; only cross-attention maps are cheap enough for this).

Within a stage, ops run sorted by strategy instance name. Latent ops update the latent
z_t before a step's noise prediction. Gate ops restrict when other strategies' ops are
active. Each op has ``gates`` (predicates on the run state, all must hold) and
``passes`` (``"main"``: the pipeline's own UNet call, ``"guidance"``: the gradient pass of
latent guidance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

import torch

from attnctl.sites import Site

if TYPE_CHECKING:
    from attnctl.attention import AttentionCall
    from attnctl.guidance import GuidanceContext
    from attnctl.run_state import RunState

Gate = Callable[["RunState"], bool]
MAIN = "main"
GUIDANCE = "guidance"


@dataclass(eq=False)
class Op:
    """Base of every planned op. ``strategy`` is the instance name from the config."""

    strategy: str
    gates: tuple[Gate, ...] = field(default=(), kw_only=True)
    passes: frozenset[str] = field(default=frozenset({MAIN, GUIDANCE}), kw_only=True)

    stage: ClassVar[int] = 0

    def is_active(self, state: RunState) -> bool:
        """Whether this op acts in the state's current step and pass."""
        return state.pass_kind in self.passes and all(g(state) for g in self.gates)


@dataclass(eq=False)
class SiteOp(Op):
    """An op bound to one attention site."""

    site: Site = field(kw_only=True)


@dataclass(eq=False)
class KeyValueOp(SiteOp):
    """Appends keys/values to the attention call (``call.append_keys``)."""

    stage: ClassVar[int] = 0

    def extend(self, call: AttentionCall) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(eq=False)
class ReweightOp(SiteOp):
    """Post-softmax reweighting ``W ⊙ A`` with ``W = sum_r a_r b_r^T``.

    With ``renormalize=True`` every row of the reweighted map is divided by its sum. The
    row sums ``sum_r a_r ⊙ (A b_r)`` come out of the same fused call (extra value columns
    ``b_r``), so this stays exact without a map. At a site where several reweight ops
    compose, the product map is renormalized once if any of them asks for it.
    """

    stage: ClassVar[int] = 1
    renormalize: bool = field(default=False, kw_only=True)

    def factors(self, call: AttentionCall) -> list[tuple[torch.Tensor, torch.Tensor]]:  # pragma: no cover
        """Return ``[(a_r, b_r)]``: ``a_r`` broadcastable to [B, heads, Nq, 1], ``b_r`` to [B, heads, Nk, 1]."""
        raise NotImplementedError


@dataclass(eq=False)
class ObserveOp(SiteOp):
    """Reads attention probabilities [B, heads, Nq, Nk] (fp32). Guidance pass only by default."""

    stage: ClassVar[int] = 2
    passes: frozenset[str] = field(default=frozenset({GUIDANCE}), kw_only=True)

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError


@dataclass(eq=False)
class LatentOp(Op):
    """Updates the latent z_t before the noise prediction of a step."""

    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def guide(self, z: torch.Tensor, ctx: GuidanceContext) -> torch.Tensor:  # pragma: no cover
        """Return the updated latent (same shape as ``z``, one row per image)."""
        raise NotImplementedError


@dataclass(eq=False)
class GateOp(Op):
    """Restricts the ops of the strategy instances ``targets`` to steps where ``gate`` holds."""

    targets: tuple[str, ...] = field(default=(), kw_only=True)
    gate: Gate = field(default=lambda state: True, kw_only=True)


@dataclass(frozen=True)
class ActiveOps:
    """The ops active at one site for the current step and pass, split by stage."""

    key_value: tuple[KeyValueOp, ...] = ()
    reweight: tuple[ReweightOp, ...] = ()
    observe: tuple[ObserveOp, ...] = ()
