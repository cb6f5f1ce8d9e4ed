"""The attention of a joint site: text and image tokens in one softmax, ops on the image queries.

A transformer's joint (dual-stream) and single-stream attention concatenates text and image
tokens along the sequence (FLUX: [text, image]; SD3: [image, text]) and runs one softmax
over all keys. attnctl's ops act on the image queries: ``joint_compute`` computes those rows
as an ``AttentionCall`` whose own keys are the image keys, followed by the text keys as
context keys (weight 1 in every reweight op, visible in measure columns and maps at
``call.key_span("txt")``), then whatever key/value ops append (seen by image queries only).
The text query rows are plain attention over the module's keys, untouched. Every block of
the attention matrix stays exact: reordering keys changes no softmax, only the order of
its sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from attnctl.attention import compute
from attnctl.call import AttentionCall
from attnctl.errors import RunError
from attnctl.ops import ActiveOps

if TYPE_CHECKING:
    from attnctl.interfaces import RunView
    from attnctl.sites import Site


def segment_spans(site: Site, text_tokens: int, image_tokens: int, length: int) -> dict[str, slice]:
    """Where each token segment of ``site.sequence`` lies in a sequence of ``length`` tokens."""
    sizes = {"txt": text_tokens, "img": image_tokens}
    spans, start = {}, 0
    for segment in site.sequence:
        spans[segment] = slice(start, start + sizes[segment])
        start += sizes[segment]
    if start != length:
        raise RunError(
            f"{site.key} ({site.name}): its attention has {length} tokens, but this call of the transformer has "
            f"{text_tokens} text and {image_tokens} image tokens; a processor that changes the sequence (extra "
            "tokens, context parallelism) cannot be controlled there"
        )
    return spans


def joint_compute(site: Site, state: RunView, ops: ActiveOps, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, bias: torch.Tensor | None, scale: float, default_scale: bool,
                  rows: tuple[int, ...] | None) -> torch.Tensor:
    """The joint attention [B, h, S, d_v] of ``site`` with ``ops`` applied to its image queries."""
    text_tokens, image_tokens = state.tokens
    spans = segment_spans(site, text_tokens, image_tokens, query.shape[-2])
    img, txt = spans["img"], spans["txt"]

    def img_first(x: torch.Tensor, dim: int) -> torch.Tensor:
        """``x`` with its ``dim`` (keys) ordered image, then text; SD3's order already is (no copy)."""
        if img.start == 0:
            return x
        return torch.cat([x.narrow(dim, img.start, image_tokens), x.narrow(dim, txt.start, text_tokens)], dim=dim)

    img_bias = txt_bias = None
    if bias is not None:  # a boolean mask stays one: the call converts its part, SDPA takes the text rows' as is
        by_query = bias.shape[-2] > 1
        img_bias = img_first(bias, -1)
        img_bias = img_bias[..., img, :] if by_query else img_bias
        txt_bias = bias[..., txt, :] if by_query else bias
    call = AttentionCall(site, state, query[..., img, :], img_first(key, -2), img_first(value, -2), img_bias, scale,
                         rows=rows, scale_is_default=default_scale, context_keys=text_tokens)
    image_out = compute(call, ops)
    text_out = F.scaled_dot_product_attention(query[..., txt, :], key, value, attn_mask=txt_bias,
                                              scale=None if default_scale else scale)
    parts = {"img": image_out.to(text_out.dtype), "txt": text_out}
    return torch.cat([parts[segment] for segment in site.sequence], dim=-2)
