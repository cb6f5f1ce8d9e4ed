"""Operations a strategy plans at attach time, and the contract each one follows.

A strategy's plan is a list of ops. Site ops act inside one attention call, in stages
that always run in this order, whatever order strategies were registered in:

0. ``ProjectionOp.project`` - rewrite the queries and the site's own keys/values before
   anything else (copy them from another row, AdaIN against a reference row, scale them,
   transform values along the text-token axis); the own-key count never changes, so
   everything after keeps indexing the same grid positions or text tokens;
1. ``KeyValueOp.extend``  - append keys/values (and their additive biases);
2. ``ReweightOp.factors`` - post-softmax reweighting ``A <- W ⊙ A`` over the site's own
   keys, given as low-rank factors ``W = sum_r a_r b_r^T``, applied exactly with fused
   attention on scaled values. Keys appended in stage 1 keep weight 1;
3. ``MapOp`` - edit the logits or probabilities explicitly (forces an explicit softmax at
   that site, computed in query chunks); ``ObserveOp.observe`` - read the effective
   attention weights (a map op that only reads, over all queries at once);
   ``MeasureOp.measure`` - read products of the effective weights with key-side columns
   (``W_eff @ columns``), computed inside the same fused call as extra value columns, so
   scalar curves over all keys cost no map;
4. ``BranchOp.branches`` - the site's output becomes a per-query weighted sum of the
   attention of stages 0-3 (the *main term*) and further fused attention calls or an
   identity branch, each with its own queries, keys and values.

Within a stage, ops run sorted by strategy instance name. Latent ops update the latent
z_t before a step's noise prediction; step ops (``attnctl.step_ops``) combine the noise
predictions, edit the latent after ``scheduler.step`` and provide variance noise; row
ops (``attnctl.rows``) add rows to the batch. Gate ops restrict when other strategies'
ops are active. Each op has ``gates`` (predicates on the run state, all must hold) and
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
#: UNet calls attnctl makes before the main ones (an inversion); only ops that name this pass act in them
RECORD = "record"


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

    def prepare(self, state: RunView) -> None:
        """Get ready for the step that starts (optional; the base does nothing).

        Called eagerly at the start of every step (``state.step_index`` and ``timestep`` set,
        before the step's first UNet call), on one op per strategy instance and op class that
        overrides it, whether or not it is active in that step. Work that cannot be traced by
        ``torch.compile`` (tokenizers, host-side tables, picking this step's row of a
        schedule) belongs here: put the results in ``state.scratch_for(self.strategy)`` under
        the same keys every step, and read them in the attention call.
        """


@dataclass(eq=False)
class SiteOp(Op):
    """An op bound to one attention site.

    ``needs_block = True`` makes attnctl record the input of the module that holds the
    site (``call.block``, see ``attnctl.block_context``) while this op is planned.

    ``joint_sites = True`` says the op was written for joint sites too (a transformer's
    text and image tokens in one softmax; ``attnctl.joint``): there its call's queries and
    own keys are the image tokens and the text keys are context keys
    (``call.key_span("txt")``). Planning refuses an op at a joint site without it, since an
    op that takes its own keys for the text (or for every key) would act on the wrong block.
    """

    site: Site = field(kw_only=True)

    needs_block: ClassVar[bool] = False
    joint_sites: ClassVar[bool] = False

    def needs_rotary(self) -> bool:
        """True if the op reads the transformer's rotary position embedding (``call.image_rotary()``):
        attnctl then keeps it for each call (FLUX), and only then."""
        return False


@dataclass(eq=False)
class ProjectionOp(SiteOp):
    """Rewrites the queries and the site's own keys/values before every other stage. Main pass by default.

    ``project(call)`` may read any tensor of the call (``call.take(x, role)`` gives, for
    every row, the same-branch row of another role) and changes them only through
    ``call.set_query(q)`` and ``call.set_own_kv(key, value)`` (same shapes as before: the
    own-key count never changes). Projection ops at a site run in instance-name order, each
    seeing the previous one's result; key/value banks, reweights, map edits and branches
    all act on the projected tensors.
    """

    stage: ClassVar[int] = 0
    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def project(self, call: AttentionCall) -> None:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(eq=False)
class KeyValueOp(SiteOp):
    """Appends keys/values to the attention call.

    ``extend(call)`` may read ``call.query``, ``call.key``, ``call.value`` (the site's own
    keys first, then whatever earlier key/value ops appended) and must change them only
    through ``call.append_keys(key, value, bias)``; it never writes into a tensor in place.
    """

    stage: ClassVar[int] = 1

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
    In fp16, a row whose reweighted mass underflows (below about 6e-8 of the row) comes out
    as zeros rather than 0/0.

    ``partition_of_unity = True`` declares that the ``a_r`` of every call sum to 1 for each
    query (SAMS: ``M^ + (1 - M^) = 1``). Then weight 1 on the keys the factors do not cover
    (appended keys, a joint site's text keys) folds into every term, ``b_r`` extended by ones,
    instead of costing one more fused term: fewer value channels, the same ``W``.
    """

    stage: ClassVar[int] = 2
    partition_of_unity: ClassVar[bool] = False
    renormalize: bool = field(default=False, kw_only=True)

    def factors(self, call: AttentionCall) -> list[tuple[torch.Tensor, torch.Tensor]]:  # pragma: no cover
        """Return ``[(a_r, b_r)]`` over the site's own keys (see the class docstring)."""
        raise NotImplementedError


@dataclass(eq=False)
class MapOp(SiteOp):
    """Edits or reads the attention map explicitly, ``query_chunk`` queries at a time. Main pass by default.

    Where a map op is active the site computes ``softmax(Q K^T * scale + bias)`` explicitly in
    fp32, for ``query_chunk`` queries at a time (None: all at once; the smallest chunk of the
    ops at the site wins), so memory stays ``B x heads x query_chunk x Nk``. For each chunk,
    ``queries`` is the slice of query positions it covers and, in this order:

    1. ``edit_logits(call, queries, logits)`` returns the logits to use (all keys, own first);
    2. softmax, then the reweight ops' ``W`` (and the renormalization, if one asked);
    3. ``edit_probs(call, queries, probs)`` returns the weights to use (no renormalization follows);
    4. ``read(call, queries, probs)`` sees the final weights (must not modify them in place).

    Keys appended by key/value ops come as the bank made them (``kv_bank`` gathers the
    unmasked keys and merges the masked ones into one key with a log-count bias), so an edit
    meant for the site's own tokens should touch the first ``call.num_own_keys`` columns only.
    The defaults leave the map unchanged. Sites where a map op ran are listed in the run
    report with the chunk size, so the cost of an explicit map is never hidden.
    """

    stage: ClassVar[int] = 3
    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)
    query_chunk: int | None = field(default=None, kw_only=True)

    def edit_logits(self, call: AttentionCall, queries: slice, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, heads, q, Nk]`` (fp32) of the chunk's queries -> the logits to use."""
        return logits

    def edit_probs(self, call: AttentionCall, queries: slice, probs: torch.Tensor) -> torch.Tensor:
        """Weights ``[B, heads, q, Nk]`` (fp32, after reweights) of the chunk's queries -> the weights to use."""
        return probs

    def read(self, call: AttentionCall, queries: slice, probs: torch.Tensor) -> None:
        """See the chunk's final weights ``[B, heads, q, Nk]`` (fp32)."""


@dataclass(eq=False)
class ObserveOp(MapOp):
    """Reads the effective attention weights ``[B, heads, Nq, Nk]`` (fp32). Guidance pass only by default.

    A map op that only reads: over all queries at once, unless another map op at the site
    asks for query chunks (then chunk by chunk, ``call``'s queries in order). ``probs`` are the weights the
    output is made of: the softmax over all keys (own and appended), after every reweight
    op at the site and the renormalization if one asked for it, and after other map ops'
    edits. Observers must not modify ``probs`` in place; it may carry gradients.
    """

    passes: frozenset[str] = field(default=frozenset({GUIDANCE}), kw_only=True)

    def __post_init__(self) -> None:
        self.query_chunk = None  # an observer sees the whole map

    def read(self, call: AttentionCall, queries: slice, probs: torch.Tensor) -> None:
        self.observe(call, probs)

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

    stage: ClassVar[int] = 3
    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def columns(self, call: AttentionCall) -> torch.Tensor:  # pragma: no cover - interface
        """Key-side columns broadcastable to ``[B, heads, Nk, m]`` (see the class docstring)."""
        raise NotImplementedError

    def measure(self, call: AttentionCall, sums: torch.Tensor, output: torch.Tensor) -> None:  # pragma: no cover
        """Receive ``sums = W_eff @ columns`` [B, heads, Nq, m] (fp32) and the site's output."""
        raise NotImplementedError


@dataclass
class Branch:
    """One term of a site's output: ``weight ⊙ attention(query, key, value, bias)``.

    ``weight`` broadcasts to ``[B, heads, Nq, 1]`` (any sign). Rows where it is zero are not
    computed: ``rows`` names the others when the op knows them from the layout (Python ints;
    no host sync, and ``torch.compile`` keeps one graph); without it, eager mode finds them
    from ``weight`` and a compiled forward computes every row (a data-dependent row set
    would break the graph). ``query``/``key``/``value``/``bias`` default to the call's tensors after
    stages 0-1 (projections and appended keys; ``bias`` only when ``key`` is the call's).
    ``identity=True`` makes the term ``weight ⊙ value`` (one value per query, as
    perturbed-attention guidance uses; needs as many keys as queries). Branches are plain
    fused attention: reweights, map edits and measurements act on the main term only.
    """

    weight: torch.Tensor
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    identity: bool = False
    rows: tuple[int, ...] | None = None


@dataclass(eq=False)
class BranchOp(SiteOp):
    """Makes the site's output a per-query weighted sum of attention calls. Main pass by default.

    ``out = main_weight ⊙ main + sum_b weight_b ⊙ branch_b`` where ``main`` is the site's
    attention after stages 0-3. ``main_weight(call)`` (default None = 1) broadcasts to
    ``[B, heads, Nq, 1]``; with several branch ops at a site the main weights multiply and
    the branches add up. Both methods may read ``call.output``, that ``main`` term
    ``[B, heads, Nq, d_v]`` (with its gradient, in a guidance pass).
    """

    stage: ClassVar[int] = 4
    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def main_weight(self, call: AttentionCall) -> torch.Tensor | None:
        """Weight of the main term (None: 1)."""
        return None

    def branches(self, call: AttentionCall) -> list[Branch]:  # pragma: no cover - interface
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

    projection: tuple[ProjectionOp, ...] = ()
    key_value: tuple[KeyValueOp, ...] = ()
    reweight: tuple[ReweightOp, ...] = ()
    #: map ops, observers included (the field keeps the name observers had before map ops)
    observe: tuple[MapOp, ...] = ()
    measure: tuple[MeasureOp, ...] = ()
    branch: tuple[BranchOp, ...] = ()

    @property
    def all(self) -> tuple[SiteOp, ...]:
        """Every op, in stage order."""
        return (*self.projection, *self.key_value, *self.reweight, *self.observe, *self.measure, *self.branch)

    @classmethod
    def of(cls, ops) -> ActiveOps:
        """Split ``ops`` (already in canonical order) by stage."""
        return cls(
            projection=tuple(op for op in ops if isinstance(op, ProjectionOp)),
            key_value=tuple(op for op in ops if isinstance(op, KeyValueOp)),
            reweight=tuple(op for op in ops if isinstance(op, ReweightOp)),
            observe=tuple(op for op in ops if isinstance(op, MapOp)),
            measure=tuple(op for op in ops if isinstance(op, MeasureOp)),
            branch=tuple(op for op in ops if isinstance(op, BranchOp)),
        )


#: no op at all (a site that only needs its processor adapted, e.g. in the guidance pass)
NO_OPS = ActiveOps()
