"""Naive references for latent guidance, written literally from the equations.

Nothing here is fast or shared with the strategies: explicit loops, explicit softmax,
explicit products over patches, float64. Also the tiny-pipeline harness the latent-guidance
tests share. Used by tests/test_latent_guidance.py and tests/test_steer_step_readings.py.
"""

from __future__ import annotations

import math
from collections import defaultdict
from contextlib import ExitStack
from typing import Sequence

import torch
import torch.nn.functional as F

import attnctl

LATENT = (8, 8)  # tiny pipeline at 64x64


# ----------------------------------------------------------------------------- attention
class NaiveRecordingProcessor:
    """Attention forward with an explicit softmax; appends the probabilities [B, h, Nq, Nk] to ``store``.

    Covers the plain transformer-block attention of SD UNets (no spatial/group norm,
    no residual connection inside the module), which is what the tiny model has.
    """

    def __init__(self, store: list[torch.Tensor]):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert attn.spatial_norm is None and attn.group_norm is None and not attn.residual_connection
        assert attention_mask is None and hidden_states.ndim == 3
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        b, heads = q.shape[0], attn.heads
        d = q.shape[-1] // heads

        def split(x):
            return x.reshape(b, -1, heads, d).permute(0, 2, 1, 3)

        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        probs = e / e.sum(dim=-1, keepdim=True)
        self.store.append(probs)
        out = (probs @ v).permute(0, 2, 1, 3).reshape(b, -1, heads * d)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


# ----------------------------------------------------------------------------- maps
def average_maps(per_site: Sequence[tuple[torch.Tensor, tuple[int, int]]]) -> dict[tuple[int, int], torch.Tensor]:
    """Average [h, HW, L] maps of one image over heads and over the sites of each grid -> {grid: [HW, L]}."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
    for probs, grid in per_site:
        groups[grid].append(probs.double())
    out = {}
    for grid, maps in groups.items():
        total = 0
        for m in maps:
            head_sum = 0
            for head in range(m.shape[0]):
                head_sum = head_sum + m[head]
            total = total + head_sum / m.shape[0]
        out[grid] = total / len(maps)
    return out


def renormalize_patch(row: torch.Tensor, token_scale: float) -> dict[int, torch.Tensor]:
    """One patch's 77 probabilities -> {text position p (1..76): renormalized attention}."""
    exps = {p: torch.exp(row[p] * token_scale) for p in range(1, row.shape[0])}
    total = sum(exps.values())
    return {p: e / total for p, e in exps.items()}


# ----------------------------------------------------------------------------- Steer Loss
def steer_loss_grid(a: torch.Tensor, mask: torch.Tensor, tokens: Sequence[int], token_scale: float, eps: float):
    """Eq. 8-9 on one grid of one image: sum over tokens i of -log(1 - prod_j (1 - A_ij + eps)^(M_j / HW)).

    ``a`` [HW, 77], ``mask`` [HW] binary. ``1 - prod`` is floored at eps (the strategy's
    documented guard); a grid without masked patches contributes 0.
    """
    hw = a.shape[0]
    if float(mask.sum()) == 0:
        return torch.zeros((), dtype=torch.float64)
    patches = [renormalize_patch(a[j], token_scale) for j in range(hw)]
    loss = torch.zeros((), dtype=torch.float64)
    for i in tokens:
        prod = torch.ones((), dtype=torch.float64)
        for j in range(hw):
            prod = prod * (1.0 - patches[j][i] + eps) ** (float(mask[j]) / hw)
        loss = loss - torch.log(torch.clamp(1.0 - prod, min=eps))
    return loss


def steer_loss_reference(per_image_sites, masks, tokens_per_image, token_scale=100.0, eps=1e-4):
    """L_s = sum over images of mean over grids of the grid loss.

    Args:
        per_image_sites: per image, a list of ([h, HW, 77] probs, (H, W)) for each read site.
        masks: per image, {(H, W): [HW] binary mask}.
        tokens_per_image: per image, the text positions to sum over.
    """
    total = torch.zeros((), dtype=torch.float64)
    for sites, mask, tokens in zip(per_image_sites, masks, tokens_per_image):
        grids = average_maps(sites)
        per_grid = [steer_loss_grid(a, mask[g].double(), tokens, token_scale, eps) for g, a in grids.items()]
        total = total + sum(per_grid) / len(per_grid)
    return total


# ----------------------------------------------------------------------------- Attend-and-Excite
def ae_kernel(sigma: float = 0.5) -> list[list[float]]:
    """Attend-and-Excite's 3x3 kernel: exp(-(d / (2 sigma))^2) per axis, product, normalized."""
    w = [math.exp(-((d / (2 * sigma)) ** 2)) for d in (-1, 0, 1)]
    k = [[w[r] * w[c] for c in range(3)] for r in range(3)]
    s = sum(sum(row) for row in k)
    return [[x / s for x in row] for row in k]


def _reflect(i: int, n: int) -> int:
    if n == 1:
        return 0
    if i < 0:
        return -i
    if i >= n:
        return 2 * n - 2 - i
    return i


def attend_excite_grid(a, mask, tokens, grid, token_scale: float):
    """max over tokens of max(0, 1 - max over masked patches of the smoothed map); 0 without masked patches."""
    h, w = grid
    if float(mask.sum()) == 0 or not tokens:
        return torch.zeros((), dtype=torch.float64)
    patches = [renormalize_patch(a[j], token_scale) for j in range(h * w)]
    k = ae_kernel()
    worst = torch.zeros((), dtype=torch.float64)
    for i in tokens:
        peak = None
        for y in range(h):
            for x in range(w):
                if float(mask[y * w + x]) == 0:
                    continue
                v = sum(
                    k[dy + 1][dx + 1] * patches[_reflect(y + dy, h) * w + _reflect(x + dx, w)][i]
                    for dy in (-1, 0, 1)
                    for dx in (-1, 0, 1)
                )
                peak = v if peak is None else torch.maximum(peak, v)
        worst = torch.maximum(worst, torch.clamp(1.0 - peak, min=0.0))
    return worst


def attend_excite_reference(per_image_sites, masks, tokens_per_image, token_scale=100.0):
    """Sum over images of mean over grids of the Attend-and-Excite grid loss."""
    total = torch.zeros((), dtype=torch.float64)
    for sites, mask, tokens in zip(per_image_sites, masks, tokens_per_image):
        grids = average_maps(sites)
        per_grid = [attend_excite_grid(a, mask[g].double(), tokens, g, token_scale) for g, a in grids.items()]
        total = total + sum(per_grid) / len(per_grid)
    return total


# ----------------------------------------------------------------------------- schedule
def alpha_reference(step_size: float, num_steps: int, k: int) -> float:
    """alpha_k = step_size * sqrt(linspace(1.0, 0.5, N)[k]), linspace written out."""
    value = 1.0 if num_steps == 1 else 1.0 + (0.5 - 1.0) * k / (num_steps - 1)
    return step_size * math.sqrt(value)


# ----------------------------------------------------------------------------- tiny UNet
def mask_batch() -> torch.Tensor:
    """Image 0: box visible at both read grids; image 1: masked only at latent (1, 1),
    which no read grid samples (nearest picks even latent indices), so it has no
    masked patch at 4x4 nor at 2x2."""
    m = torch.zeros(2, 1, 64, 64)
    m[0, :, 16:48, 20:44] = 1
    m[1, :, 8:16, 8:16] = 1
    return m


def mask_at(m: torch.Tensor, grid) -> torch.Tensor:
    latent = F.interpolate(m, size=LATENT, mode="nearest")
    return F.interpolate(latent, size=grid, mode="nearest").flatten(1)


def reference_loss_and_grad(unet, read_sites, z, cond_sample, emb, t, masks, tokens):
    """Naive processors at the read sites, literal loss, autograd gradient wrt z."""
    store: list[torch.Tensor] = []
    saved = {}
    ordered = sorted(read_sites, key=lambda s: s.index)
    for site in ordered:
        module = unet.get_submodule(site.name)
        saved[site.name] = module.processor
        module.set_processor(NaiveRecordingProcessor(store))
    try:
        z = z.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            unet(torch.cat([z, cond_sample[:, 4:]], 1), t, encoder_hidden_states=emb)
            grids = [s.grid(LATENT) for s in ordered]
            per_image = [[(p[i], gr) for p, gr in zip(store, grids)] for i in range(z.shape[0])]
            mask_per_image = [{gr: mask_at(masks[i : i + 1], gr)[0] for gr in set(grids)} for i in range(z.shape[0])]
            loss = steer_loss_reference(per_image, mask_per_image, tokens)
        grad = torch.autograd.grad(loss, z)[0]
    finally:
        for site in ordered:
            unet.get_submodule(site.name).set_processor(saved[site.name])
    return loss, grad


def run_guided(pipe, config, manager, steps, prompt="a red cat", latents=None, guidance_scale=7.5, on_unet=None):
    """Run the tiny pipeline (64x64, output latents) with ``config`` attached; returns the
    steer instance's per-step log and the prompt's token count."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))
    mask = mask_batch()[0, 0]
    n = len(pipe.tokenizer(prompt).input_ids) - 2
    with ExitStack() as stack:
        ctl = stack.enter_context(attnctl.attach(pipe, config, manager))
        if on_unet is not None:
            handle = pipe.unet.register_forward_pre_hook(lambda m, a, kw: on_unet(ctl, a, kw), with_kwargs=True)
            stack.callback(handle.remove)
        layout = attnctl.BatchLayout.for_pipeline(1, 1, cfg=guidance_scale > 1)
        state = stack.enter_context(ctl.run(layout, mask=mask, token_indices=[list(range(1, n + 1))]))
        pipe(
            prompt, image=image, mask_image=Image.fromarray((mask.numpy() * 255).astype("uint8")), height=64, width=64,
            num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents, output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
        return state.scratch.get("steer", {}).get("history", []), n


def first_main_call(pipe, config, manager, steps, latents):
    """Run like :func:`run_guided` and also return the first main-pass UNet call's ``sample``,
    timestep and text embeddings (what the guided first step fed the UNet)."""
    from attnctl.guidance import UNetCall

    first = {}

    def record(ctl, args, kwargs):
        if not ctl.state.in_guidance and not first:
            call = UNetCall(pipe.unet, args, kwargs)
            first.update(sample=call.get("sample").clone(), t=float(call.get("timestep")),
                         emb=call.get("encoder_hidden_states").clone())

    history, n = run_guided(pipe, config, manager, steps, latents=latents, on_unet=record)
    return history, n, first
