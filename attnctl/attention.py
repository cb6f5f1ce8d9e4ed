"""The attention computation of a controlled site.

``controlled_attention`` follows diffusers' ``AttnProcessor2_0`` step by step (norms,
projections, head split, output projection, residual) and replaces only the core
``softmax(QK^T/sqrt(d)) V`` by ``AttentionCall.compute``, which applies the active ops:

- key/value ops append keys, values and additive biases;
- reweight ops contribute low-rank factors of ``W`` in ``(W ⊙ A) V``; with
  ``W = sum_r a_r b_r^T`` this is ``sum_r a_r ⊙ (A (b_r ⊙ V))``, so one fused SDPA call on
  the channel-concatenated values ``[b_1 ⊙ V, ..., b_R ⊙ V]`` gives every term exactly,
  and no Nq x Nk matrix is ever built;
- observe ops force an explicit fp32 softmax (only where they are active).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from attnctl.ops import ActiveOps
from attnctl.sites import Site

if TYPE_CHECKING:
    from attnctl.run_state import RunState


@dataclass
class AttentionCall:
    """One attention call, head-split: ``query`` [B, h, Nq, d]; ``key``/``value`` [B, h, Nk, d].

    Attributes:
        site: the site being called.
        state: the run state.
        query, key, value: projected, head-split tensors.
        bias: additive float bias broadcastable to [B, h, Nq, Nk], or None.
        scale: softmax scale (1/sqrt(d) for standard modules).
        num_own_keys: how many keys came from the module's own input (before any appending).
    """

    site: Site
    state: RunState
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    num_own_keys: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_own_keys = self.key.shape[-2]

    def append_keys(self, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Append ``key``/``value`` [B, h|1, n, d] with optional additive ``bias`` [B, h|1, 1|Nq, n]."""
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

    def compute(self, ops: ActiveOps) -> torch.Tensor:
        """Apply ``ops`` and return the attention output [B, h, Nq, d_v]."""
        for op in ops.key_value:
            op.extend(self)
        factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for op in ops.reweight:
            new = op.factors(self)
            factors = new if factors is None else [(a1 * a2, b1 * b2) for a1, b1 in factors for a2, b2 in new]
        if ops.observe:
            return self._explicit(ops, factors)
        if factors is None:
            return F.scaled_dot_product_attention(self.query, self.key, self.value, attn_mask=self.bias, scale=self.scale)
        d = self.value.shape[-1]
        columns = [(b * self.value).to(self.value.dtype) for _, b in factors]
        renormalize = any(op.renormalize for op in ops.reweight)
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

    def probabilities(self) -> torch.Tensor:
        """Explicit attention probabilities [B, h, Nq, Nk] in fp32 (materializes the map)."""
        logits = torch.matmul(self.query.float(), self.key.float().transpose(-1, -2)) * self.scale
        if self.bias is not None:
            logits = logits + self.bias.float()
        return logits.softmax(dim=-1)

    def _explicit(self, ops: ActiveOps, factors) -> torch.Tensor:
        probs = self.probabilities()
        for op in ops.observe:
            op.observe(self, probs)
        value = self.value.float()
        if factors is None:
            return torch.matmul(probs, value).to(self.value.dtype)
        out = sum(a.float() * torch.matmul(probs, b.float() * value) for a, b in factors)
        if any(op.renormalize for op in ops.reweight):
            ones = value.new_ones(*value.shape[:-1], 1)
            out = out / sum(a.float() * torch.matmul(probs, b.float() * ones) for a, b in factors)
        return out.to(self.value.dtype)


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


def controlled_attention(
    attn,
    site: Site,
    ops: ActiveOps,
    state: RunState,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    temb: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward of a diffusers ``Attention`` module with ``ops`` applied (mirrors AttnProcessor2_0)."""
    p = project_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
    call = AttentionCall(site, state, p.query, p.key, p.value, p.mask, p.query.shape[-1] ** -0.5)
    return finish_attention(attn, p, call.compute(ops))
