"""Operations a strategy plans at attach time, and the contract each one follows.

A strategy's plan is a list of ops. Site ops act inside one attention call, in three
stages that always run in this order, whatever order strategies were registered in:

1. ``KeyValueOp.extend``  - append keys/values (and their additive biases);
2. ``ReweightOp.factors`` - post-softmax reweighting ``A <- W ⊙ A`` over the site's own
   keys, given as low-rank factors ``W = sum_r a_r b_r^T``, applied exactly with fused
   attention on scaled values. Keys appended in stage 1 keep weight 1;
3. ``ObserveOp.observe``  - read the effective attention weights (forces an explicit
   softmax at that site; only cross-attention maps are cheap enough for this);
   ``MeasureOp.measure`` - read products of the effective weights with key-side columns
   (``W_eff @ columns``), computed inside the same fused call as extra value columns, so
   scalar curves over all keys cost no map.

Within a stage, ops run sorted by strategy instance name. Latent ops update the latent
z_t before a step's noise prediction. Gate ops restrict when other strategies' ops are
active. Each op has ``gates`` (predicates on the run state, all must hold) and
``passes`` (``"main"``: the pipeline's own UNet call, ``"guidance"``: the gradient pass of
latent guidance).

The full contract (what ``call`` holds at each stage, shapes, dtypes, what may be
mutated, memo keys) is in ``AttentionCall``'s docstring and docs/writing-strategies.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar

from attnctl.sites import Site

if TYPE_CHECKING:
    import torch

    from attnctl.call import AttentionCall
    from attnctl.interfaces import GuidanceView, RunView

Gate = Callable[["RunView"], bool]
MAIN = "main"
GUIDANCE = "guidance"


@dataclass(eq=False)
class Op:
    """Base of every planned op. ``strategy`` is the instance name from the config."""

    strategy: str
    gates: tuple[Gate, ...] = field(default=(), kw_only=True)
    passes: frozenset[str] = field(default=frozenset({MAIN, GUIDANCE}), kw_only=True)

    stage: ClassVar[int] = 0

    def is_active(self, state: RunView) -> bool:
        """Whether this op acts in the state's current step and pass."""
        return state.pass_kind in self.passes and all(g(state) for g in self.gates)


@dataclass(eq=False)
class SiteOp(Op):
    """An op bound to one attention site."""

    site: Site = field(kw_only=True)


@dataclass(eq=False)
class KeyValueOp(SiteOp):
    """Appends keys/values to the attention call.

    ``extend(call)`` may read ``call.query``, ``call.key``, ``call.value`` (the site's own
    keys first, then whatever earlier key/value ops appended) and must change them only
    through ``call.append_keys(key, value, bias)``; it never writes into a tensor in place.
    """

    stage: ClassVar[int] = 0

    def extend(self, call: AttentionCall) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(eq=False)
class ReweightOp(SiteOp):
    """Post-softmax reweighting ``W ⊙ A`` of the site's own keys, ``W = sum_r a_r b_r^T``.

    ``factors(call)`` returns ``[(a_r, b_r)]``: ``a_r`` broadcastable to
    ``[B, heads, Nq, 1]`` (per query) and ``b_r`` to ``[B, heads, call.num_own_keys, 1]``
    (per own key; a key dimension of 1 broadcasts). ``B`` is ``len(call.rows)``. Factors
    may be any floating dtype (fp32 is usual); the core multiplies in the promoted dtype
    and casts to the value dtype. Keys appended by key/value ops are not covered by the
    factors: their weight is 1, whatever the reweight ops (so a reweighting written for a
    site's own tokens composes with any bank of extra keys).

    With ``renormalize=True`` every row of the reweighted map is divided by its sum. The
    row sums come out of the same fused call (extra value columns), so this stays exact
    without a map. At a site where several reweight ops compose, ``W`` is the product of
    their weights and the map is renormalized once if any of them asks for it.
    """

    stage: ClassVar[int] = 1
    renormalize: bool = field(default=False, kw_only=True)

    def factors(self, call: AttentionCall) -> list[tuple[torch.Tensor, torch.Tensor]]:  # pragma: no cover
        """Return ``[(a_r, b_r)]`` over the site's own keys (see the class docstring)."""
        raise NotImplementedError


@dataclass(eq=False)
class ObserveOp(SiteOp):
    """Reads the effective attention weights ``[B, heads, Nq, Nk]`` (fp32). Guidance pass only by default.

    ``probs`` are the weights the output is made of: the softmax over all keys (own and
    appended), after every reweight op at the site and the renormalization if one asked
    for it. Observers must not modify ``probs`` in place; it may carry gradients.
    """

    stage: ClassVar[int] = 2
    passes: frozenset[str] = field(default=frozenset({GUIDANCE}), kw_only=True)

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:  # pragma: no cover
        raise NotImplementedError


@dataclass(eq=False)
class MeasureOp(SiteOp):
    """Measures the effective attention weights against key-side columns, without a map. Main pass by default.

    ``columns(call)`` returns key-side vectors broadcastable to ``[B, heads, Nk, m]`` over
    **all** keys (``Nk = call.key.shape[-2]``: the site's own keys first, then the appended
    ones), any floating dtype. The core then calls ``measure(call, sums, output)`` with

    - ``sums = W_eff @ columns``, ``[B, heads, Nq, m]`` fp32, where ``W_eff`` are the weights
      the output is made of: the softmax over all keys, after every reweight op at the site
      and the renormalization if one asked for it (what an ``ObserveOp`` sees as ``probs``);
    - ``output``, the attention output ``W_eff @ value`` ``[B, heads, Nq, d_v]`` the site returns.

    The columns ride along as extra value columns of the site's fused attention call (each
    reweight term scales them like the values), so a measurement costs ``m`` channels more,
    never an ``Nq x Nk`` map; they are computed at the precision of that call (the value
    dtype) and handed over as fp32. With an ``ObserveOp`` active at the same site the map
    is explicit anyway and the sums are its fp32 products. ``measure`` must not modify
    ``sums`` or ``output`` in place.
    """

    stage: ClassVar[int] = 2
    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def columns(self, call: AttentionCall) -> torch.Tensor:  # pragma: no cover - interface
        """Key-side columns broadcastable to ``[B, heads, Nk, m]`` (see the class docstring)."""
        raise NotImplementedError

    def measure(self, call: AttentionCall, sums: torch.Tensor, output: torch.Tensor) -> None:  # pragma: no cover
        """Receive ``sums = W_eff @ columns`` [B, heads, Nq, m] (fp32) and the site's output."""
        raise NotImplementedError


@dataclass(eq=False)
class LatentOp(Op):
    """Updates the latent z_t before the noise prediction of a step."""

    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def guide(self, z: torch.Tensor, ctx: GuidanceView) -> torch.Tensor:  # pragma: no cover
        """Return the updated latent (same shape as ``z``, one row per image).

        ``z`` is the step's UNet-input latent: what the scheduler's ``scale_model_input``
        makes of its sample (the sample itself for DDIM; ``sample / sqrt(sigma^2 + 1)`` for
        Euler-type schedulers), so an update means the same for every scheduler. The core
        maps the result back to the scheduler's sample for ``scheduler.step``.
        """
        raise NotImplementedError


@dataclass(eq=False)
class GateOp(Op):
    """Restricts the ops of the strategy instances ``targets`` to steps where ``gate`` holds.

    ``gate`` should have a readable ``str()`` (e.g. ``0.6 <= t/T``): warnings about a
    strategy that cannot act in a run quote it.
    """

    targets: tuple[str, ...] = field(default=(), kw_only=True)
    gate: Gate = field(default=lambda state: True, kw_only=True)


@dataclass(frozen=True)
class ActiveOps:
    """The ops active at one site for the current step and pass, split by stage."""

    key_value: tuple[KeyValueOp, ...] = ()
    reweight: tuple[ReweightOp, ...] = ()
    observe: tuple[ObserveOp, ...] = ()
    measure: tuple[MeasureOp, ...] = ()


#: no op at all (a site that only needs its processor adapted, e.g. in the guidance pass)
NO_OPS = ActiveOps()
