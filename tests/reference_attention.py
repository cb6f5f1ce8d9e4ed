"""Naive references for the attention-editing strategies, written from the paper's equations.

Everything here is deliberately literal: explicit softmax, the explicit HW x HW weight
matrix of SAMS (Eq. 4-7), the explicit concatenation of all 2*HW keys of MAKVS (Eq. 10-12).
They compute in float64 so that comparisons measure the fast path's own error.
``NaiveSelfAttnProcessor`` runs such a function inside a diffusers ``Attention`` module,
so a whole UNet can be evaluated with the reference at chosen sites.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from attnctl import BatchLayout


def softmax_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``A = softmax(Q K^T * scale)`` explicitly, in float64: [B, h, Nq, Nk]."""
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1)


def sams_weights(mask: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 4-7: ``W = M^ M^T + (1-M^)(1-M^)^T`` with ``M^ = (1-tau) M + tau/HW``; [B, 1, HW, HW]."""
    m = mask.double()
    m_hat = (1 - tau) * m + tau / m.shape[-1]  # Eq. 7
    col = m_hat[:, :, None]
    w = col @ col.transpose(-1, -2) + (1 - col) @ (1 - col).transpose(-1, -2)  # Eq. 4 + Eq. 5, summed (Eq. 6)
    return w[:, None]


def naive_sams(q, k, v, mask, tau: float, scale: float, renormalize: bool = False) -> torch.Tensor:
    """SAMS output ``A^ V`` with ``A^ = W ⊙ A``; ``mask`` [B, HW] binary, 1 = inpaint."""
    a_hat = sams_weights(mask, tau) * softmax_attention(q, k, scale)
    if renormalize:
        a_hat = a_hat / a_hat.sum(-1, keepdim=True)
    return a_hat @ v.double()


def makvs_bank(k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 10: ``K~(i) = K(i)`` where ``M(i) = 0``, else the mean of K over unmasked tokens (per row, head)."""
    k = k.double()
    keep = (1 - mask.double())[:, None, :, None]  # [B, 1, HW, 1]
    mean = (keep * k).sum(2, keepdim=True) / keep.sum(2, keepdim=True)
    return torch.where(keep > 0, k, mean)


def naive_makvs(q, k, v, mask, lam: float, scale: float) -> torch.Tensor:
    """Eq. 11-12 with all 2*HW keys: ``softmax(Q [K; lam K~]^T * scale) [V; V~]``.

    A row whose mask covers every token has no unmasked mean; it gets plain attention.
    """
    keys = torch.cat([k.double(), lam * makvs_bank(k, mask)], dim=2)
    values = torch.cat([v.double(), makvs_bank(v, mask)], dim=2)
    out = softmax_attention(q, keys, scale) @ values
    plain = softmax_attention(q, k, scale) @ v.double()
    full = (mask.sum(-1) == mask.shape[-1])[:, None, None, None]
    return torch.where(full, plain, out)


def naive_row_bank(q, k, v, refs: list[int], lam: float, scale: float) -> torch.Tensor:
    """Each row ``r`` attends to ``[K_r; lam K_refs[r]]`` with values ``[V_r; V_refs[r]]``; the reference row itself: plain."""
    outs = []
    for r, ref in enumerate(refs):
        kr, vr = k[r : r + 1].double(), v[r : r + 1].double()
        if ref != r:
            kr = torch.cat([kr, lam * k[ref : ref + 1].double()], dim=2)
            vr = torch.cat([vr, v[ref : ref + 1].double()], dim=2)
        outs.append(softmax_attention(q[r : r + 1], kr, scale) @ vr)
    return torch.cat(outs)


def site_masks(mask: torch.Tensor, latent_hw: tuple[int, int], grid: tuple[int, int], images: list[int]) -> torch.Tensor:
    """Pixel masks [K, 1, H, W] -> binary [rows, HW] at ``grid`` (binarize, nearest to latent, nearest to grid)."""
    m = (mask.float() >= 0.5).float()
    m = F.interpolate(F.interpolate(m, size=latent_hw, mode="nearest"), size=grid, mode="nearest").flatten(1)
    return m[torch.tensor([i % m.shape[0] for i in images])]


Reference = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class NaiveSelfAttnProcessor:
    """Self-attention processor for SD ``attn1`` modules computing the core with ``reference(q, k, v, scale)``.

    Mirrors diffusers' ``AttnProcessor2_0`` for the case SD self-attention uses (3-D input,
    no group/spatial norm, no attention mask, no residual inside the module).
    """

    def __init__(self, reference: Reference):
        self.reference = reference

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert hidden_states.ndim == 3 and encoder_hidden_states is None and attention_mask is None
        assert attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, n, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        out = self.reference(q, k, v, d**-0.5).to(q.dtype)
        out = out.transpose(1, 2).reshape(b, n, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


# ----------------------------------------------------------------------------- harness
def random_case(layout: BatchLayout, hw: tuple[int, int], boxes, heads=2, d=16, seed=0):
    """A random q/k/v case [rows, heads, HW, d] and one box mask [K, 1, H, W] per ``(top, left, bottom, right)``."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(boxes), 1, *hw)
    for i, (t, l, b, r) in enumerate(boxes):
        mask[i, :, t:b, l:r] = 1
    n = hw[0] * hw[1]
    q, k, v = (torch.randn(len(layout), heads, n, d, generator=g) for _ in range(3))
    return mask, q, k, v


def make_call(site, mask: torch.Tensor, latent_hw: tuple[int, int], layout, q, k, v, scale: float):
    """A RunState in a step with ``mask`` (pixel/latent masks, see RunState) and an AttentionCall at ``site``."""
    from attnctl.call import AttentionCall
    from attnctl.plan import Plan
    from attnctl.run_state import RunState
    from attnctl.sites import SiteTable

    state = RunState(Plan(sites=SiteTable([site])), layout, mask=mask)
    state.begin_step(500.0, latent_hw=latent_hw)
    return state, AttentionCall(site, state, q, k, v, None, scale)


def tiny_inputs(height: int, width: int, boxes: list[tuple[int, int, int, int]], seed: int = 0):
    """A random RGB image and one binary mask per box ``(top, left, bottom, right)`` (pixels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    image = Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))
    masks = []
    for top, left, bottom, right in boxes:
        m = np.zeros((height, width), dtype=np.uint8)
        m[top:bottom, left:right] = 255
        masks.append(Image.fromarray(m))
    tensor = torch.stack([torch.from_numpy(np.array(m)).float()[None] / 255 for m in masks])
    return image, masks, tensor


def pipe_latents(pipe, image, masks, prompts: list[str], n_per: int, cfg: bool, size: tuple[int, int], steps: int = 1):
    """A short seeded run of the tiny inpainting pipeline: (final latents, the UNet's outputs of every call)."""
    outputs: list[torch.Tensor] = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: outputs.append(out[0].detach().clone()))
    try:
        latents = pipe(
            prompt=prompts,
            image=[image] * len(masks) if len(masks) > 1 else image,
            mask_image=masks if len(masks) > 1 else masks[0],
            num_images_per_prompt=n_per,
            guidance_scale=7.5 if cfg else 1.0,
            num_inference_steps=steps,
            height=size[0],
            width=size[1],
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        ).images
    finally:
        hook.remove()
    return latents, outputs


def set_naive(pipe, selector: str, make_reference) -> None:
    """Put ``NaiveSelfAttnProcessor(make_reference(site))`` on every site ``selector`` picks."""
    from attnctl import describe_sites, select_sites

    for site in select_sites(selector, describe_sites(pipe.unet)):
        pipe.unet.get_submodule(site.name).set_processor(NaiveSelfAttnProcessor(make_reference(site)))


def single_thread():
    """Generator for an autouse fixture: tiny models run ~30x faster on one thread when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
