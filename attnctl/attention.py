"""The attention computation of a controlled site.

``AttentionCall.compute`` replaces the core ``softmax(QK^T/sqrt(d)) V`` of one attention
call and applies the active ops:

- key/value ops append keys, values and additive biases;
- reweight ops contribute low-rank factors of ``W`` in ``(W ⊙ A) V``; with
  ``W = sum_r a_r b_r^T`` this is ``sum_r a_r ⊙ (A (b_r ⊙ V))``, so one fused SDPA call on
  the channel-concatenated values ``[b_1 ⊙ V, ..., b_R ⊙ V]`` gives every term exactly,
  and no Nq x Nk matrix is ever built;
- observe ops force an explicit fp32 softmax (only where they are active).

``project_attention`` / ``finish_attention`` mirror what diffusers' ``AttnProcessor2_0``
does before and after the core (norms, projections, head split; output projection,
residual); processor adapters (``attnctl.adapters``) build on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable

import torch
import torch.nn.functional as F

from attnctl.errors import ConfigError
from attnctl.ops import ActiveOps, ReweightOp
from attnctl.sites import Site

if TYPE_CHECKING:
    from attnctl.run_state import BatchLayout, RunState


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
      text tokens for cross-attention); keys after them were appended by key/value ops.
      During stage 1 (key/value ops) ``key``/``value`` grow; from stage 2 on they are final.
    - ``bias``: an additive float bias broadcastable to [B, h, Nq, Nk] (the module's own
      attention mask, then the biases of appended keys), or None. Boolean masks are turned
      into 0 / -inf on creation.
    - Ops never write into these tensors in place; key/value ops extend them only through
      ``append_keys``.
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
    """

    site: Site
    state: RunState
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    rows: tuple[int, ...] | None = None
    num_own_keys: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_own_keys = self.key.shape[-2]
        if self.rows is None:
            self.rows = self.state.rows
        if self.bias is not None and self.bias.dtype == torch.bool:  # SDPA's "True = attend" form
            self.bias = torch.zeros(self.bias.shape, dtype=self.query.dtype, device=self.bias.device).masked_fill(
                ~self.bias, -math.inf
            )

    # ------------------------------------------------------------------ what ops read
    @property
    def layout(self) -> BatchLayout:
        """Branch, image and prompt of each row of this call."""
        return self.state.layout.subset(self.rows)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (H, W) of the site in this run."""
        return self.state.grid(self.site)

    @property
    def own_key(self) -> torch.Tensor:
        """The module's own keys [B, h, num_own_keys, d]."""
        return self.key[..., : self.num_own_keys, :]

    @property
    def own_value(self) -> torch.Tensor:
        """The module's own values [B, h, num_own_keys, d_v]."""
        return self.value[..., : self.num_own_keys, :]

    def mask(self) -> torch.Tensor:
        """Binary inpainting masks ``[B, H*W]`` (fp32, 1 = inpaint) of this call's rows at the site's grid."""
        return self.state.masks_for_rows(self.site.level, self.rows, self.query.device)

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per run for ``key`` at this site's level, rows and device; then the cached value."""
        return self.state.memo(("call", key, self.site.level, self.rows, self.query.device), compute)

    # ------------------------------------------------------------------ what key/value ops do
    def append_keys(self, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Append ``key``/``value`` [B, h|1, n, d] with optional additive ``bias`` [B|1, h|1, 1|Nq, n]."""
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

    # ------------------------------------------------------------------ the core
    def compute(self, ops: ActiveOps) -> torch.Tensor:
        """Apply ``ops`` and return the attention output [B, h, Nq, d_v]."""
        for op in ops.key_value:
            op.extend(self)
        factors = self._weight_factors(ops.reweight)
        renormalize = any(op.renormalize for op in ops.reweight)
        if ops.observe:
            return self._explicit(ops, factors, renormalize)
        if factors is None:
            return F.scaled_dot_product_attention(self.query, self.key, self.value, attn_mask=self.bias, scale=self.scale)
        d = self.value.shape[-1]
        columns = [(b * self.value).to(self.value.dtype) for _, b in factors]
        if renormalize:  # A b_r: the row sums of each term, as extra value columns
            ones = self.value.new_ones(*self.value.shape[:-1], 1)
            columns += [(b * ones).to(self.value.dtype) for _, b in factors]
        out = _sdpa_wide_values(self.query, self.key, torch.cat(columns, dim=-1), self.bias, self.scale)
        result = None
        for r, (a, _) in enumerate(factors):
            term = a * out[..., r * d : (r + 1) * d]
            result = term if result is None else result + term
        if renormalize:
            base = len(factors) * d
            result = result / sum(a * out[..., base + r : base + r + 1] for r, (a, _) in enumerate(factors))
        return result.to(self.value.dtype)

    def _weight_factors(self, reweight: tuple[ReweightOp, ...]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Factors of ``W`` over all keys: the product of the ops' weights on own keys, 1 on appended keys."""
        if not reweight:
            return None
        factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for op in reweight:
            new = op.factors(self)
            for _, b in new:
                if b.shape[-2] not in (1, self.num_own_keys):
                    raise ConfigError(
                        f"strategies.{op.strategy} at {self.site.key}: a reweight factor b has {b.shape[-2]} keys, "
                        f"but factors cover the site's {self.num_own_keys} own keys (or 1 to broadcast); keys "
                        "appended by key/value ops keep weight 1 without being listed"
                    )
            factors = new if factors is None else [(a1 * a2, b1 * b2) for a1, b1 in factors for a2, b2 in new]
        n_own, n_extra = self.num_own_keys, self.key.shape[-2] - self.num_own_keys
        if n_extra == 0:
            return factors
        # appended keys: each term is zero there, and one extra term (1, indicator) gives weight 1
        padded = []
        for a, b in factors:
            b = b.expand(*b.shape[:-2], n_own, 1)
            padded.append((a, torch.cat([b, b.new_zeros(*b.shape[:-2], n_extra, 1)], dim=-2)))
        indicator = self.query.new_zeros(1, 1, n_own + n_extra, 1, dtype=torch.float32)
        indicator[..., n_own:, :] = 1.0
        return padded + [(indicator.new_ones(1, 1, 1, 1), indicator)]

    def probabilities(self) -> torch.Tensor:
        """Explicit softmax attention probabilities [B, h, Nq, Nk] in fp32 (materializes the map)."""
        logits = torch.matmul(self.query.float(), self.key.float().transpose(-1, -2)) * self.scale
        if self.bias is not None:
            logits = logits + self.bias.float()
        return logits.softmax(dim=-1)

    def _explicit(self, ops: ActiveOps, factors, renormalize: bool) -> torch.Tensor:
        weights = self.probabilities()
        if factors is not None:
            w = sum(a.float() * b.float().transpose(-1, -2) for a, b in factors)
            weights = w * weights
            if renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        for op in ops.observe:
            op.observe(self, weights)
        return torch.matmul(weights, self.value.float()).to(self.value.dtype)


def _sdpa_wide_values(query, key, values, bias, scale: float) -> torch.Tensor:
    """SDPA with values wider than the queries, without an Nq x Nk map.

    Fused kernels want one head width for q, k and v (on CPU, a wider ``v`` falls back to
    the math backend, which builds the full attention map). Zero channels appended to q
    and k leave every logit unchanged, so q, k and v are padded to a common width (a
    multiple of 8, as CUDA kernels need) and the output is cut back.
    """
    dq, dv = query.shape[-1], values.shape[-1]
    if dq == dv:
        return F.scaled_dot_product_attention(query, key, values, attn_mask=bias, scale=scale)
    width = -(-max(dq, dv) // 8) * 8
    query, key = F.pad(query, (0, width - dq)), F.pad(key, (0, width - dq))
    out = F.scaled_dot_product_attention(query, key, F.pad(values, (0, width - dv)), attn_mask=bias, scale=scale)
    return out[..., :dv]


@dataclass
class ProjectedAttention:
    """Head-split inputs of one diffusers ``Attention`` call, and what is needed to finish it.

    ``query``/``key``/``value`` are [B, heads, N, d]; ``mask`` is the module's own attention
    mask prepared as [B, heads, Nq|1, Nk], or None.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    residual: torch.Tensor
    spatial_shape: tuple[int, int, int, int] | None


def project_attention(
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    temb: torch.Tensor | None = None,
) -> ProjectedAttention:
    """Everything ``AttnProcessor2_0`` does before the attention core: norms, projections, head split."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial_shape = None
    if hidden_states.ndim == 4:
        spatial_shape = tuple(hidden_states.shape)
        b, c, h, w = spatial_shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return ProjectedAttention(query, key, value, attention_mask, residual, spatial_shape)


def finish_attention(attn, projected: ProjectedAttention, out: torch.Tensor) -> torch.Tensor:
    """Everything ``AttnProcessor2_0`` does after the core: merge heads, output projection, residual."""
    batch_size, heads, _, head_dim = out.shape
    hidden_states = out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(projected.query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if projected.spatial_shape is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*projected.spatial_shape)
    if attn.residual_connection:
        hidden_states = hidden_states + projected.residual
    return hidden_states / attn.rescale_output_factor
