"""The attention computation of a controlled site.

``compute(call, ops)`` replaces the core ``softmax(QK^T/sqrt(d)) V`` of one attention
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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnctl.call import AttentionCall
from attnctl.errors import ConfigError
from attnctl.ops import ActiveOps, ReweightOp


def compute(call: AttentionCall, ops: ActiveOps) -> torch.Tensor:
    """Apply ``ops`` to ``call`` and return the attention output [B, h, Nq, d_v]."""
    for op in ops.key_value:
        op.extend(call)
    factors = _weight_factors(call, ops.reweight)
    renormalize = any(op.renormalize for op in ops.reweight)
    if ops.observe:
        return _explicit(call, ops, factors, renormalize)
    if factors is None:
        return F.scaled_dot_product_attention(call.query, call.key, call.value, attn_mask=call.bias, scale=call.scale)
    d = call.value.shape[-1]
    columns = [(b * call.value).to(call.value.dtype) for _, b in factors]
    if renormalize:  # A b_r: the row sums of each term, as extra value columns
        ones = call.value.new_ones(*call.value.shape[:-1], 1)
        columns += [(b * ones).to(call.value.dtype) for _, b in factors]
    out = _sdpa_wide_values(call.query, call.key, torch.cat(columns, dim=-1), call.bias, call.scale)
    result = None
    for r, (a, _) in enumerate(factors):
        term = a * out[..., r * d : (r + 1) * d]
        result = term if result is None else result + term
    if renormalize:
        base = len(factors) * d
        result = result / sum(a * out[..., base + r : base + r + 1] for r, (a, _) in enumerate(factors))
    return result.to(call.value.dtype)


def _weight_factors(
    call: AttentionCall, reweight: tuple[ReweightOp, ...]
) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Factors of ``W`` over all keys: the product of the ops' weights on own keys, 1 on appended keys."""
    if not reweight:
        return None
    factors: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    for op in reweight:
        new = op.factors(call)
        for _, b in new:
            if b.shape[-2] not in (1, call.num_own_keys):
                raise ConfigError(
                    f"strategies.{op.strategy} at {call.site.key}: a reweight factor b has {b.shape[-2]} keys, "
                    f"but factors cover the site's {call.num_own_keys} own keys (or 1 to broadcast); keys "
                    "appended by key/value ops keep weight 1 without being listed"
                )
        factors = new if factors is None else [(a1 * a2, b1 * b2) for a1, b1 in factors for a2, b2 in new]
    n_own, n_extra = call.num_own_keys, call.key.shape[-2] - call.num_own_keys
    if n_extra == 0:
        return factors
    # appended keys: each term is zero there, and one extra term (1, indicator) gives weight 1
    padded = []
    for a, b in factors:
        b = b.expand(*b.shape[:-2], n_own, 1)
        padded.append((a, torch.cat([b, b.new_zeros(*b.shape[:-2], n_extra, 1)], dim=-2)))
    indicator = call.query.new_zeros(1, 1, n_own + n_extra, 1, dtype=torch.float32)
    indicator[..., n_own:, :] = 1.0
    return padded + [(indicator.new_ones(1, 1, 1, 1), indicator)]


def probabilities(call: AttentionCall) -> torch.Tensor:
    """Explicit softmax attention probabilities [B, h, Nq, Nk] in fp32 (materializes the map)."""
    logits = torch.matmul(call.query.float(), call.key.float().transpose(-1, -2)) * call.scale
    if call.bias is not None:
        logits = logits + call.bias.float()
    return logits.softmax(dim=-1)


def _explicit(call: AttentionCall, ops: ActiveOps, factors, renormalize: bool) -> torch.Tensor:
    weights = probabilities(call)
    if factors is not None:
        w = sum(a.float() * b.float().transpose(-1, -2) for a, b in factors)
        weights = w * weights
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    for op in ops.observe:
        op.observe(call, weights)
    return torch.matmul(weights, call.value.float()).to(call.value.dtype)


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
