"""The attention computation of a controlled site.

``compute(call, ops)`` replaces the core ``softmax(QK^T/sqrt(d)) V`` of one attention
call and applies the active ops:

- projection ops rewrite the queries and the own keys/values first;
- key/value ops append keys, values and additive biases;
- reweight ops contribute low-rank factors of ``W`` in ``(W ⊙ A) V``; with
  ``W = sum_r a_r b_r^T`` this is ``sum_r a_r ⊙ (A (b_r ⊙ V))``, so one fused SDPA call on
  the channel-concatenated values ``[b_1 ⊙ V, ..., b_R ⊙ V]`` gives every term exactly,
  and no Nq x Nk matrix is ever built;
- measure ops' key-side columns ride along as extra value columns of the same fused call
  (scaled by every reweight term like the values), so ``W_eff @ columns`` costs a few
  channels, not a map;
- map ops (observers included) force an explicit fp32 softmax, one query chunk at a time
  (only where they are active);
- branch ops add further fused attention calls (or identity terms), weighted per query.

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
from attnctl.ops import ActiveOps, BranchOp, MeasureOp, ReweightOp


def compute(call: AttentionCall, ops: ActiveOps) -> torch.Tensor:
    """Apply ``ops`` to ``call`` and return the attention output [B, h, Nq, d_v]."""
    for op in ops.projection:
        op.project(call)
    for op in ops.key_value:
        op.extend(call)
    factors = _weight_factors(call, ops.reweight)
    renormalize = any(op.renormalize for op in ops.reweight)
    columns, widths = _measure_columns(call, ops.measure)
    if ops.observe:
        out = _explicit(call, ops, factors, renormalize, columns, widths)
    elif factors is None and columns is None:
        out = F.scaled_dot_product_attention(call.query, call.key, call.value, attn_mask=call.bias, scale=call.sdpa_scale)
    else:
        out, sums = _fused(call, factors, renormalize, columns)
        if sums is not None:
            _hand_out(call, ops.measure, widths, sums, out)
    if ops.branch:
        out = _with_branches(call, ops.branch, out)
    return out


def _with_branches(call: AttentionCall, branch_ops: tuple[BranchOp, ...], main: torch.Tensor) -> torch.Tensor:
    """``main_weight ⊙ main + sum_b weight_b ⊙ branch_b`` (one fused call per branch, on the rows it weighs)."""
    dtype = main.dtype
    call.output = main  # what branch ops may read (PAIntA's look-ahead starts from it)
    main_weight, terms = None, []
    for op in branch_ops:
        w = op.main_weight(call)
        if w is not None:
            main_weight = w if main_weight is None else main_weight * w
        terms.extend(op.branches(call))
    out = main if main_weight is None else main_weight * main
    batch, nq = call.query.shape[0], call.query.shape[-2]
    for branch in terms:
        query = call.query if branch.query is None else branch.query
        key = call.key if branch.key is None else branch.key
        value = call.value if branch.value is None else branch.value
        bias = branch.bias if branch.bias is not None or branch.key is not None else call.bias
        weight = branch.weight
        if branch.identity:
            if value.shape[-2] != nq:
                raise ConfigError(f"{call.site.key}: an identity branch needs one value per query ({nq}), "
                                  f"got {value.shape[-2]} values")
            term = value
        else:
            scale = call.sdpa_scale if query.shape[-1] == call.query.shape[-1] else call.scale
            term = _rows_sdpa(query, key, value, bias, scale, weight, batch, branch.rows)
        out = out + weight * term
    return out.to(dtype)


def _rows_sdpa(query, key, value, bias, scale: float, weight: torch.Tensor, batch: int,
               rows: tuple[int, ...] | None = None) -> torch.Tensor:
    """Fused attention on ``rows``, or on the rows where ``weight`` is nonzero (zeros elsewhere)."""
    if rows is None:
        if weight.shape[0] != batch:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
        used = (weight != 0).reshape(batch, -1).any(dim=1)
        if torch.compiler.is_compiling():  # every row: a data-dependent row set would break the graph
            full = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
            return torch.where(used[:, None, None, None], full, torch.zeros_like(full))
        if bool(used.all()):
            return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
        rows = used.nonzero().flatten()
    elif len(rows) == batch:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
    else:
        rows = torch.tensor(rows, device=query.device)
    if bias is not None and bias.shape[0] == batch:
        bias = bias.index_select(0, rows)
    part = F.scaled_dot_product_attention(query.index_select(0, rows), key.index_select(0, rows),
                                          value.index_select(0, rows), attn_mask=bias, scale=scale)
    out = value.new_zeros(batch, *part.shape[1:])
    return out.index_copy(0, rows, part)


def _fused(call: AttentionCall, factors, renormalize: bool, columns: torch.Tensor | None):
    """One SDPA call on ``[b_r ⊙ V, b_r ⊙ C]`` per reweight term (plus row sums): (output, sums or None).

    Without reweight factors the single term is ``A [V, C]``; measurement columns ``C`` are
    scaled by every ``b_r`` and combined with the ``a_r`` exactly like the values, so the
    sums are ``W_eff @ C`` with the same weights the output is made of.
    """
    dtype = call.value.dtype
    d = call.value.shape[-1]
    m = 0 if columns is None else columns.shape[-1]
    terms = factors if factors is not None else [(None, None)]
    blocks = []
    for _, b in terms:
        blocks.append(call.value if b is None else (b * call.value).to(dtype))
        if columns is not None:
            blocks.append((columns if b is None else b * columns).to(dtype))
    if renormalize:  # A b_r: the row sums of each term, as extra value columns
        ones = call.value.new_ones(*call.value.shape[:-1], 1)
        blocks += [(b * ones).to(dtype) for _, b in terms]
    out = _sdpa_wide_values(call.query, call.key, torch.cat(blocks, dim=-1), call.bias, call.scale)
    width = d + m
    result = sums = None
    for r, (a, _) in enumerate(terms):
        value_part = out[..., r * width : r * width + d]
        term = value_part if a is None else a * value_part
        result = term if result is None else result + term
        if columns is not None:
            measured = out[..., r * width + d : (r + 1) * width].float()
            measured = measured if a is None else a.float() * measured
            sums = measured if sums is None else sums + measured
    if renormalize:
        base = len(terms) * width
        row_sums = sum(a * out[..., base + r : base + r + 1] for r, (a, _) in enumerate(terms))
        # in fp16 a row whose kept mass is below ~6e-8 sums to 0 (its terms too): 0, not 0/0
        row_sums = torch.where(row_sums == 0, torch.ones_like(row_sums), row_sums)
        result = result / row_sums
        if sums is not None:
            sums = sums / row_sums.float()
    return result.to(dtype), sums


def _measure_columns(call: AttentionCall, measure: tuple[MeasureOp, ...]) -> tuple[torch.Tensor | None, list[int]]:
    """The measure ops' columns over all keys side by side, [B, h, Nk, m_total] fp32, and each op's width."""
    if not measure:
        return None, []
    b, h, n_keys = call.query.shape[0], call.query.shape[1], call.key.shape[-2]
    blocks = []
    for op in measure:
        c = op.columns(call)
        if c.ndim != 4 or c.shape[-2] not in (1, n_keys):
            raise ConfigError(
                f"strategies.{op.strategy} at {call.site.key}: measurement columns must broadcast to "
                f"[B, heads, {n_keys}, m] (all keys: {call.num_own_keys} own + {n_keys - call.num_own_keys} appended), "
                f"got shape {tuple(c.shape)}"
            )
        blocks.append(c.float().expand(b, h, n_keys, c.shape[-1]))
    return torch.cat(blocks, dim=-1), [c.shape[-1] for c in blocks]


def _hand_out(call: AttentionCall, measure: tuple[MeasureOp, ...], widths: list[int], sums: torch.Tensor,
              output: torch.Tensor) -> None:
    """Give each measure op its own slice of ``sums`` (in op order, as the columns were stacked)."""
    start = 0
    for op, width in zip(measure, widths):
        op.measure(call, sums[..., start : start + width], output)
        start += width


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
            # checked eagerly; a compiled graph skips it (a traced f-string with symbolic sizes breaks the graph)
            if not torch.compiler.is_compiling() and b.shape[-2] not in (1, call.num_own_keys):
                raise ConfigError(
                    f"strategies.{op.strategy} at {call.site.key}: a reweight factor b has {b.shape[-2]} keys, "
                    f"but factors cover the site's {call.num_own_keys} own keys (or 1 to broadcast); keys "
                    "appended by key/value ops keep weight 1 without being listed"
                )
        factors = new if factors is None else [(a1 * a2, b1 * b2) for a1, b1 in factors for a2, b2 in new]
    n_own, n_extra = call.num_own_keys, call.key.shape[-2] - call.num_own_keys
    if n_extra == 0:
        return factors
    if all(op.partition_of_unity for op in reweight):
        # sum_r a_r = 1 (a product of partitions is one): weight 1 on the other keys folds into every term
        return [(a, torch.cat([b.expand(*b.shape[:-2], n_own, 1), b.new_ones(*b.shape[:-2], n_extra, 1)], dim=-2))
                for a, b in factors]
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


def _explicit(call: AttentionCall, ops: ActiveOps, factors, renormalize: bool,
              columns: torch.Tensor | None, widths: list[int]) -> torch.Tensor:
    """The site's attention with an explicit fp32 map, ``query_chunk`` queries at a time (map ops' contract)."""
    nq = call.query.shape[-2]
    chunk = nq  # the smallest chunk any map op asks for (a loop: dynamo traces no min() over a generator)
    for op in ops.observe:
        if op.query_chunk and op.query_chunk < chunk:
            chunk = op.query_chunk
    note = getattr(call.state, "note_explicit", None)
    if note is not None:
        note(call.site, chunk, call.query.shape[0] * call.query.shape[1] * min(chunk, nq) * call.key.shape[-2] * 4)
    key_t, value = call.key.float().transpose(-1, -2), call.value.float()
    outs, sums = [], []
    for start in range(0, nq, chunk):
        queries = slice(start, min(nq, start + chunk))
        logits = torch.matmul(call.query[..., queries, :].float(), key_t) * call.scale
        if call.bias is not None:
            logits = logits + _query_rows(call.bias, queries, nq).float()
        for op in ops.observe:
            logits = op.edit_logits(call, queries, logits)
        weights = logits.softmax(dim=-1)
        if factors is not None:
            w = sum(_query_rows(a, queries, nq).float() * b.float().transpose(-1, -2) for a, b in factors)
            weights = w * weights
            if renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        for op in ops.observe:
            weights = op.edit_probs(call, queries, weights)
        for op in ops.observe:
            op.read(call, queries, weights)
        outs.append(torch.matmul(weights, value))
        if columns is not None:
            sums.append(torch.matmul(weights, columns))
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)).to(call.value.dtype)
    if columns is not None:
        _hand_out(call, ops.measure, widths, sums[0] if len(sums) == 1 else torch.cat(sums, dim=-2), out)
    return out


def _query_rows(x: torch.Tensor, queries: slice, nq: int) -> torch.Tensor:
    """The part of a tensor broadcastable over queries (dim -2) that belongs to ``queries``."""
    return x[..., queries, :] if x.shape[-2] == nq and nq > 1 else x


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
