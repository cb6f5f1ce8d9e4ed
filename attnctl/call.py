"""The attention call ops act on: one site's head-split queries, keys and values in one run.

This is the interface every site op sees (``ProjectionOp.project``, ``KeyValueOp.extend``,
``ReweightOp.factors``, ``MapOp``, ``MeasureOp``, ``BranchOp``); the computation that applies
the ops is ``attnctl.attention.compute``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

if TYPE_CHECKING:
    import torch

    from attnctl.interfaces import RunView
    from attnctl.layout import BatchLayout
    from attnctl.sites import Site


def partner_positions(state: RunView, rows: Sequence[int], role: str, where: str) -> list[int]:
    """For every row of a call on ``rows`` (of the run's layout), the position in that call of its
    partner of ``role``; a ``RunError`` naming ``where`` if one is not in the call."""
    from attnctl.errors import RunError

    full = state.layout
    index = {row: i for i, row in enumerate(rows)}
    out = []
    for row in rows:
        try:
            partner = full.partner(row, role)
        except KeyError as exc:
            raise RunError(f"{where}: {exc.args[0]}") from None
        if partner not in index:
            raise RunError(
                f"{where}: the {role!r} row beside row {row} is not in this call (rows {list(rows)}); "
                "ops that read other rows act in the main pass only"
            )
        out.append(index[partner])
    return out


@dataclass
class AttentionCall:
    """One attention call at a controlled site, head-split, as ops see it.

    The contract every op relies on:

    - ``query`` [B, h, Nq, d]; ``key`` [B, h, Nk, d]; ``value`` [B, h, Nk, d_v], in the
      model's dtype. ``B == len(rows)``: row ``i`` of every tensor is row ``rows[i]`` of
      the run's ``BatchLayout`` (``layout`` gives its branch, image and prompt). Rows are
      not always the whole UNet batch: in the guidance pass they are the conditional rows,
      and a processor such as PAG's runs attention on a subset of its batch.
    - The first ``num_own_keys`` keys are the module's own (image tokens for self-attention,
      text tokens for cross-attention). At a joint site of a transformer (text and image
      tokens in one attention) the queries are the image tokens, the own keys the image
      tokens, and the text keys follow them as ``context_keys``; ``key_span("txt")`` /
      ``key_span("img")`` say where each segment's keys are at any site. Keys after those
      were appended by key/value ops. Context and appended keys keep weight 1 in reweight
      ops. During stage 1 (key/value ops) ``key``/``value`` grow; from stage 2 on they are final.
    - ``bias``: an additive float bias broadcastable to [B, h, Nq, Nk] (the module's own
      attention mask, then the biases of appended keys), or None. Boolean masks are turned
      into 0 / -inf on creation.
    - Ops never write into these tensors in place. Projection ops (stage 0) replace them
      only through ``set_query`` / ``set_own_kv``; key/value ops (stage 1) extend them only
      through ``append_keys``.
    - Rows of other roles (a source or reference row a strategy added, see
      ``attnctl.rows``) are in the same call: ``take(x, role)`` gives, for every row, the
      tensor of that row's partner of ``role`` (same branch, same image if it has one).
    - ``mask()`` and ``memo()`` are keyed by this call's site level, rows and device, so an
      op's memo key only needs what else its value depends on (its own parameters).

    Attributes:
        site: the site being called.
        state: the run state.
        query, key, value: projected, head-split tensors.
        bias: additive float bias, or None.
        scale: softmax scale (1/sqrt(d) for standard modules).
        rows: rows of the run's layout this call's batch is made of (default: the state's).
        num_own_keys: how many keys came from the module's own input (before any appending).
        context_keys: keys of the module's other token segment that follow the own keys
            (a joint site's text keys; 0 elsewhere).
    """

    site: Site
    state: RunView
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    rows: tuple[int, ...] | None = None
    #: the processor left the scale to SDPA (1/sqrt(d)); fused calls then do too, bit for bit as the stock processor
    scale_is_default: bool = field(default=False, kw_only=True)
    context_keys: int = field(default=0, kw_only=True)
    num_own_keys: int = field(init=False)
    #: the site's attention before branch ops ``[B, h, Nq, d_v]``: set when they run (``BranchOp``)
    output: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.num_own_keys = self.key.shape[-2] - self.context_keys
        if self.rows is None:
            self.rows = self.state.rows
        if self.bias is not None and not self.bias.dtype.is_floating_point:
            # SDPA's boolean form (True = attend) as an additive bias
            self.bias = self.query.new_zeros(self.bias.shape).masked_fill(~self.bias, -math.inf)

    @property
    def sdpa_scale(self) -> float | None:
        """The ``scale`` argument for a fused call at the call's own head width (None: SDPA's default)."""
        return None if self.scale_is_default and self.query.shape[-1] == self.key.shape[-1] else self.scale

    # ------------------------------------------------------------------ what ops read
    @property
    def layout(self) -> BatchLayout:
        """Branch, image and prompt of each row of this call."""
        return self.state.layout.subset(self.rows)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (H, W) of the site in this run."""
        return self.state.grid(self.site)

    def key_span(self, segment: str) -> slice | None:
        """Where the keys of token segment ``"img"`` or ``"txt"`` are, or None if the site has none."""
        n = self.num_own_keys
        if self.context_keys:  # a joint site: image keys, then text keys
            return {"img": slice(0, n), "txt": slice(n, n + self.context_keys)}.get(segment)
        own = "txt" if self.site.kind == "cross" else "img"
        return slice(0, n) if segment == own else None

    def image_rotary(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cos, sin)`` [N, d] of the rotary position embedding of this call's image tokens (FLUX), or None
        (no rotary embedding, or no planned op asked for it: ``SiteOp.needs_rotary``)."""
        rotary = self.state.rotary
        if rotary is None:
            return None
        text = self.state.tokens[0] if self.site.sequence and self.site.sequence[0] == "txt" else 0
        n = self.state.tokens[1]
        return rotary[0][text : text + n], rotary[1][text : text + n]

    @property
    def text_length(self) -> int:
        """How many text positions maps of this site have (``text_probs``' width; 0 where the site holds no text)."""
        if self.context_keys:
            return self.context_keys + (0 if self.state.text_start_token else 1)
        return self.num_own_keys if self.site.kind == "cross" else 0

    def text_key(self, position: int) -> int:
        """The index among this call's keys of text ``position`` (as counted by ``text_probs``)."""
        if self.context_keys:
            return self.num_own_keys + position - (0 if self.state.text_start_token else 1)
        return position

    def text_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """The img>txt maps in ``probs`` [B, h, Nq, Nk] (an observe op's): text columns, text position = column.

        At a UNet cross site that is ``probs`` itself. At a joint site the image queries'
        softmax also spends mass on image keys, so the text columns are renormalized over the
        text (each row sums to 1, as a cross-attention map over the same text would), and
        where the text has no start token (FLUX's T5) a zero column 0 stands for it, so that
        token positions and losses count as on CLIP text (the prompt's tokens are 1..m).
        """
        import torch.nn.functional as F

        if not self.context_keys:
            return probs
        text = probs[..., self.key_span("txt")]
        text = text / text.sum(dim=-1, keepdim=True)
        return text if self.state.text_start_token else F.pad(text, (1, 0))

    @property
    def own_key(self) -> torch.Tensor:
        """The module's own keys [B, h, num_own_keys, d]."""
        return self.key[..., : self.num_own_keys, :]

    @property
    def own_value(self) -> torch.Tensor:
        """The module's own values [B, h, num_own_keys, d_v]."""
        return self.value[..., : self.num_own_keys, :]

    @property
    def block(self) -> Any:
        """The ``BlockInput`` of the module holding this site (ops with ``needs_block``; ``attnctl.block_context``)."""
        return self.state.block_input(self.site)

    def mask(self) -> torch.Tensor:
        """Binary inpainting masks ``[B, H*W]`` (fp32, 1 = inpaint) of this call's rows at the site's grid."""
        return self.state.masks_for_rows(self.site.level, self.rows, self.query.device)

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per run for ``key`` at this site's level, rows and device; then the cached value."""
        return self.state.memo(("call", key, self.site.level, self.rows, self.query.device), compute)

    def rows_of(self, role: str, branch: str | None = None) -> list[int]:
        """Positions in this call's batch of the rows with ``role`` (and ``branch`` if given)."""
        layout = self.layout
        return [i for i, (ro, b) in enumerate(zip(layout.roles, layout.branches))
                if ro == role and (branch is None or b == branch)]

    def on_rows(self, role: str, branch: str | None = None) -> torch.Tensor:
        """``[B, 1, 1, 1]`` fp32: 1 on ``rows_of(role, branch)``, 0 elsewhere (a per-row weight or mask);
        made once per run and rows."""
        import torch

        def make() -> torch.Tensor:
            on = set(self.rows_of(role, branch))
            return torch.tensor([float(i in on) for i in range(len(self.layout))], device=self.query.device)

        return self.memo(("on_rows", role, branch), make)[:, None, None, None]

    def partners(self, role: str) -> list[int]:
        """For every row of this call, the position in this call of its partner of ``role``.

        Raises ``RunError`` if a partner is not in this call (e.g. in the guidance pass,
        which runs the main conditional rows only).
        """
        return partner_positions(self.state, self.rows, role, self.site.key)

    def take(self, tensor: torch.Tensor, role: str) -> torch.Tensor:
        """``tensor`` [B, ...] re-indexed so row i holds row i's partner of ``role`` (see ``partners``)."""
        import torch

        index = self.memo(("partners", role), lambda: torch.tensor(self.partners(role), device=tensor.device))
        return tensor.index_select(0, index.to(tensor.device))

    # ------------------------------------------------------------------ what projection ops do
    def set_query(self, query: torch.Tensor) -> None:
        """Replace the queries (stage 0 only); same shape as before."""
        self._check_stage0("set_query")
        if query.shape != self.query.shape:
            raise ValueError(f"{self.site.key}: set_query needs shape {tuple(self.query.shape)}, got {tuple(query.shape)}")
        self.query = query.to(self.query.dtype)

    def set_own_kv(self, key: torch.Tensor | None = None, value: torch.Tensor | None = None) -> None:
        """Replace the own keys and/or values (stage 0 only); same shapes as before, so positions keep their meaning."""
        self._check_stage0("set_own_kv")
        if key is not None:
            if key.shape != self.key.shape:
                raise ValueError(f"{self.site.key}: set_own_kv needs keys of shape {tuple(self.key.shape)}, "
                                 f"got {tuple(key.shape)}")
            self.key = key.to(self.key.dtype)
        if value is not None:
            if value.shape != self.value.shape:
                raise ValueError(f"{self.site.key}: set_own_kv needs values of shape {tuple(self.value.shape)}, "
                                 f"got {tuple(value.shape)}")
            self.value = value.to(self.value.dtype)

    def _check_stage0(self, what: str) -> None:
        if self.key.shape[-2] != self.num_own_keys + self.context_keys:
            raise ValueError(f"{self.site.key}: {what} after keys were appended; projections run before key/value ops")

    # ------------------------------------------------------------------ what key/value ops do
    def append_keys(self, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Append ``key``/``value`` [B, h|1, n, d] with optional additive ``bias`` [B|1, h|1, 1|Nq, n]."""
        import torch

        b, h, nq, _ = self.query.shape
        n_old, n_new = self.key.shape[-2], key.shape[-2]
        key = key.expand(b, h, n_new, key.shape[-1]).to(self.key.dtype)
        value = value.expand(b, h, n_new, value.shape[-1]).to(self.value.dtype)
        if bias is not None or self.bias is not None:
            dtype = self.query.dtype
            old = self.bias if self.bias is not None else self.query.new_zeros(1, 1, 1, n_old)
            new = bias if bias is not None else self.query.new_zeros(1, 1, 1, n_new)
            shape = torch.broadcast_shapes(old.shape[:-1], new.shape[:-1])
            self.bias = torch.cat([old.to(dtype).expand(*shape, n_old), new.to(dtype).expand(*shape, n_new)], dim=-1)
        self.key = torch.cat([self.key, key], dim=-2)
        self.value = torch.cat([self.value, value], dim=-2)
