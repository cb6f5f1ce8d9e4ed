"""Naive references on a transformer's joint attention: the full (text + image) matrix, explicit softmax.

``NaiveJointAttention`` replaces every ``scaled_dot_product_attention`` call of a transformer
forward with the literal computation over the whole joint matrix in float64: SAMS weights
``W`` on the img>img block (1 on every other block), MAKVS bank keys ``[K; lam K~]`` seen by
image queries only, text query rows plain. It knows where text and image tokens are from
the model family's sequence order and the call's token counts, as the paper's equations
read on joint attention (docs/architecture.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode

from reference_attention import makvs_bank, sams_weights

_SDPA = torch.nn.functional.scaled_dot_product_attention


def tiny_flux(seed: int = 0, dtype=torch.float32):
    """A bare tiny FLUX transformer: 2 joint and 2 single sites, RoPE, 2 heads of 16."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, out_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval().to(dtype)


def tiny_sd3(seed: int = 0, dtype=torch.float32, dual_attention_layers: tuple[int, ...] = (0,)):
    """A bare tiny SD3.5-like transformer: 2 joint sites and one image-only attn2 (block 0), patch 2."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=32, out_channels=16, dual_attention_layers=dual_attention_layers,
                                 qk_norm="rms_norm").eval().to(dtype)


def flux_inputs(grid: tuple[int, int], batch: int = 1, text: int = 7, seed: int = 1, dtype=torch.float32) -> dict:
    """Keyword arguments of one FLUX transformer call on a ``grid`` of image tokens (timestep sigma 0.5)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    return dict(hidden_states=torch.randn(batch, h * w, 16, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g).to(dtype),
                pooled_projections=torch.randn(batch, 32, generator=g).to(dtype),
                timestep=torch.full((batch,), 0.5, dtype=dtype), img_ids=ids.reshape(-1, 3).to(dtype),
                txt_ids=torch.zeros(text, 3, dtype=dtype), return_dict=False)


def sd3_inputs(latent: tuple[int, int], batch: int = 2, text: int = 5, seed: int = 1, dtype=torch.float32) -> dict:
    """Keyword arguments of one SD3 transformer call on a ``latent`` (timestep 500)."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, *latent, generator=g).to(dtype),
                encoder_hidden_states=torch.randn(batch, text, 32, generator=g).to(dtype),
                pooled_projections=torch.randn(batch, 32, generator=g).to(dtype),
                timestep=torch.full((batch,), 500.0, dtype=dtype), return_dict=False)


@dataclass
class JointCase:
    """Where the segments are: ``order`` of the joint sequence, ``text`` tokens, per-row token ``masks`` [B, N]."""

    order: tuple[str, ...]
    text: int
    masks: torch.Tensor
    tau: float | None = None
    lam: float | None = None
    #: FLUX's (cos, sin) [S, d] of the call's tokens: the bank's mean key is taken at position 0 and
    #: rotated to each masked token (kv_bank rope: positions)
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None


def positions_bank(k_img: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Eq. 10 on rotated keys, with complex numbers: pairs (x_2i, x_2i+1) = x_2i + i x_2i+1 turned by e^{i theta}."""
    turn = torch.complex(cos[:, 0::2].double(), sin[:, 0::2].double())  # e^{i theta} per token and pair
    kc = torch.view_as_complex(k_img.double().reshape(*k_img.shape[:-1], -1, 2).contiguous())
    at_zero = kc * turn.conj()
    keep = (1 - mask.double())[:, None, :, None]
    mean = (keep * at_zero).sum(2, keepdim=True) / keep.sum(2, keepdim=True)
    tilde = torch.where(keep > 0, kc, mean * turn)
    return torch.view_as_real(tilde).flatten(-2)


def naive_joint(q, k, v, case: JointCase, scale: float) -> torch.Tensor:
    """One attention call, literally: ``(W ⊙ softmax(Q [K; lam K~]^T)) [V; V~]`` on image rows, plain text rows."""
    q, k, v = q.double(), k.double(), v.double()
    s, n = q.shape[-2], case.masks.shape[-1]
    order = case.order if s > n else ("img",)  # SD3.5's attn2: image tokens only
    sizes = {"txt": case.text, "img": n}
    spans, start = {}, 0
    for segment in order:
        spans[segment] = torch.arange(start, start + sizes[segment])
        start += sizes[segment]
    img = spans["img"]
    keys, values = k, v
    if case.lam is not None:  # the bank follows the module's keys, for image queries only
        k_img, v_img = k[..., img, :], v[..., img, :]
        if case.rotary is not None:
            cos, sin = (t[img] for t in case.rotary)
            bank = positions_bank(k_img, case.masks, cos, sin)
        else:
            bank = makvs_bank(k_img, case.masks)
        keys = torch.cat([k, case.lam * bank], dim=2)
        values = torch.cat([v, makvs_bank(v_img, case.masks)], dim=2)
    probs = torch.softmax(q @ keys.transpose(-1, -2) * scale, dim=-1)
    weights = torch.ones_like(probs[:, :1])
    if case.tau is not None:
        block = sams_weights(case.masks, case.tau)  # [B, 1, N, N]
        weights[:, :, img[:, None], img[None, :]] = block
    out = (weights * probs) @ values
    if "txt" in spans and case.lam is not None:  # text queries never see the bank
        txt = spans["txt"]
        plain = torch.softmax(q[..., txt, :] @ k.transpose(-1, -2) * scale, dim=-1) @ v
        out[..., txt, :] = plain
    return out


class NaiveJointAttention(TorchFunctionMode):
    """Within the block, every SDPA call is ``naive_joint`` (the model's whole forward runs the reference)."""

    def __init__(self, case: JointCase):
        super().__init__()
        self.case, self.calls = case, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        self.calls += 1
        q, k, v = args[:3] if len(args) >= 3 else (kwargs["query"], kwargs["key"], kwargs["value"])
        scale = kwargs.get("scale") or q.shape[-1] ** -0.5
        return naive_joint(q, k, v, self.case, scale).to(q.dtype)


class RecordJointProbs(TorchFunctionMode):
    """Runs every SDPA call as is and keeps its explicit float64 softmax ``[B, h, S, S]`` (the reference maps)."""

    def __init__(self):
        super().__init__()
        self.probs: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            q, k = args[:2] if len(args) >= 2 else (kwargs["query"], kwargs["key"])
            scale = kwargs.get("scale") or q.shape[-1] ** -0.5
            self.probs.append(torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1))
        return func(*args, **kwargs)
