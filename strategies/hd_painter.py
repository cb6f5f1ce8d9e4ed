"""``hd_painter``: HD-Painter's PAIntA and RASG (Manukyan et al., arXiv 2312.14091), as the authors' code computes them.

**PAIntA** (prompt-aware introverted attention), at the self-attention of every transformer
block whose grid is 1/16 or 1/32 of the image (``self/2,self/4``), while ``t > 500``. With
``y`` the site's attention output (after ``to_out``) and ``x`` the block's input, on the
conditional row of each image::

    P   = softmax over the 77 text tokens of attn2.to_q(norm2(x + y)) attn2.to_k(text)^T * scale,
          mean over heads                                                   (fp32, [N, 77])
    s   = sum of P over the prompt's tokens and the full prompt's EOT,  smoothed by Attend-and-Excite's
          3x3 kernel (sigma 0.5, zero padding),  s <- clip((s - median s) / max s, 0, 1)
    out = m ⊙ softmax(Q (u ⊙ K)^T / sqrt(d)) V + (1 - m) ⊙ softmax(Q K^T / sqrt(d)) V,  u = m + (1 - m) s

``m`` is the mask at the grid (1 = hole). This is their ``logits * c`` with
``c_ij = 1 - m_i (1 - m_j)(1 - s_j)``, written as two fused calls; both CFG rows of an image
use its conditional row's ``s``, as theirs do.

**RASG** (region-aware stochastic guidance), every step: the cross-attention logits at the
1/32 grid (``cross/4``) of the conditional rows, mean over every head of those sites, give
``score = -sum_j BCE_with_logits(S_j - 1, m16)`` over the same tokens; ``g = grad_z score / std``.
The DDIM step becomes ``z' = sqrt(a') x0 + sqrt(1 - a' - (eta sigma)^2) eps + eta sigma g`` with
their ``sigma`` from the per-step alphas (``1 - beta``; ``sigma="ddim"``: the cumulative ones,
as the diffusers port). The gradient is taken in a conditional pass with PAIntA active (rows
do not mix, so it is their gradient through the CFG pass), and the last step adds no noise
(theirs decodes that step's ``x0``).

Quirks kept (switches where theirs differ from the port): masks are the 1-pixel dilated
pixel mask resized bicubically (PIL) to each grid and thresholded at 0.5 (``mask="grid"``:
attnctl's nearest masks); ``grad / std`` without centring (``grad_norm="mean-std"``: the
port's). Not reproduced: their own 999, 979, ... timestep grid (the pipeline's scheduler
sets the timesteps) and their padding of images to multiples of 64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import attnctl
from attnctl.errors import ConfigError, RunError
from attnctl.layout import MAIN_ROLE
from attnctl.ops import GUIDANCE, MAIN, Branch, BranchOp, LatentOp, MapOp
from attnctl.params import StrategySpec, help_text as _h
from attnctl.selectors import select_sites
from attnctl.sites import Site, SiteTable, grid_at
from attnctl.step_ops import PostStepOp
from strategies._attention_sites import self_attention_sites
from strategies._ddim import ddim_step_alphas
from strategies._smoothing import smoothing_kernel

if TYPE_CHECKING:
    import torch

    from attnctl.call import AttentionCall
    from attnctl.interfaces import GuidanceView, RunView
    from attnctl.step_ops import StepView

NAME = "hd_painter"


@dataclass(frozen=True)
class HDPainterParams:
    """Parameters of ``hd_painter`` (defaults: the authors' ``hd_inpaint.py``)."""

    painta: bool = field(default=True, metadata=_h("prompt-aware introverted attention"))
    painta_sites: str = field(default="self/2,self/4", metadata=_h("self sites (their grids 1/16 and 1/32)"))
    painta_until: float = field(default=500, metadata=_h("PAIntA acts while the timestep is > this"))
    rasg: bool = field(default=True, metadata=_h("region-aware stochastic guidance"))
    rasg_sites: str = field(default="cross/4", metadata=_h("cross sites whose logits score (their 1/32 grid)"))
    rasg_eta: float = field(default=0.1, metadata=_h("eta of RASG's DDIM step"))
    sigma: str = field(default="per-step", metadata=_h("per-step (theirs: 1 - beta) | ddim (cumulative, the port)"))
    grad_norm: str = field(default="std", metadata=_h("std (theirs: grad / std) | mean-std (the port)"))
    mask: str = field(default="authors", metadata=_h("authors (dilated, bicubic at each grid) | grid (nearest)"))

    def __post_init__(self) -> None:
        for key, allowed in (("sigma", ("per-step", "ddim")), ("grad_norm", ("std", "mean-std")),
                             ("mask", ("authors", "grid"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}={getattr(self, key)!r}: choose one of {', '.join(allowed)}")
        if not (self.painta or self.rasg):
            raise ConfigError("painta and rasg are both off; enable one (or disable the strategy)")
        if self.rasg_eta < 0:
            raise ConfigError(f"rasg_eta must be >= 0, got {self.rasg_eta}")


SPEC = StrategySpec(NAME, "HD-Painter: prompt-aware introverted attention (PAIntA) and region-aware guidance (RASG)",
                    HDPainterParams)


# ----------------------------------------------------------------------------- per step, eagerly
@dataclass(eq=False)
class Prepared:
    """Token positions and masks at every grid the instance reads, made eagerly before each step's
    UNet calls (a tokenizer and PIL have no place in a compiled forward): ``Op.prepare``."""

    levels: tuple[int, ...] = field(default=(), kw_only=True)
    mask_mode: str = field(default="authors", kw_only=True)

    def prepare(self, state: RunView) -> None:
        scratch = state.scratch_for(self.strategy)
        if "tokens" not in scratch:
            scratch["tokens"] = [_token_positions(state, p) for p in range(len(state.prompts))]
        if state.latent_hw is not None and scratch.get("hw") != state.latent_hw:
            scratch["hw"] = state.latent_hw
            scratch["masks"] = {level: _masks(state, level, self.mask_mode) for level in self.levels}


def _masks(state: RunView, level: int, mode: str) -> torch.Tensor:
    """[images, H*W] binary masks at ``level``'s grid."""
    import torch

    if mode == "grid":
        return state.mask(level)[: state.layout.num_images]
    grid = grid_at(level, state.latent_hw)
    return torch.stack([_authors_mask(state.input_mask(i), grid) for i in range(state.layout.num_images)])


def _token_positions(state: RunView, prompt: int) -> list[int]:
    """Their ``token_idx``: the prompt's own tokens and the EOT position of the full prompt (with
    the recipe's positive words, whose own tokens are left out)."""
    if state.tokenizer is None or prompt >= len(state.prompts):
        raise RunError(f"strategies.{NAME}: needs the pipeline's tokenizer and the prompt texts: attach to the "
                       "pipeline and give Controller.run(..., prompts=[...]) (harmonpaint_recipe's Runner does)")
    tokenizer = state.tokenizer
    ids = tokenizer(state.prompts[prompt], truncation=True, max_length=tokenizer.model_max_length).input_ids
    own = state.token_indices[prompt] if prompt < len(state.token_indices) else list(range(1, len(ids) - 1))
    return [*own, len(ids) - 1]


def _authors_mask(pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Their grid mask: the pixel mask dilated by one pixel (4-connected), resized by PIL's bicubic
    filter to ``grid`` as 0/255 uint8, then ``> 0.5`` after dividing by 255. [H*W] float32."""
    import numpy as np
    import torch
    from PIL import Image

    m = pixels > 0.5
    grown = m.clone()
    grown[1:] |= m[:-1]
    grown[:-1] |= m[1:]
    grown[:, 1:] |= m[:, :-1]
    grown[:, :-1] |= m[:, 1:]
    image = Image.fromarray(grown.numpy().astype(np.uint8) * 255).resize((grid[1], grid[0]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0 > 0.5).float().flatten()


# ----------------------------------------------------------------------------- PAIntA
@dataclass(eq=False)
class PaintaOp(Prepared, BranchOp):
    """Hole queries attend to keys scaled by ``u = m + (1 - m) s`` (see the module docstring)."""

    needs_block = True
    passes: frozenset[str] = field(default=frozenset({MAIN, GUIDANCE}), kw_only=True)

    def main_weight(self, call: AttentionCall) -> torch.Tensor:
        return 1.0 - self._hole(call)

    def branches(self, call: AttentionCall) -> list[Branch]:
        u = self._relevance(call)  # [B, N]
        n = call.num_own_keys
        key = call.key.clone()
        key[..., :n, :] = call.key[..., :n, :] * u[:, None, :, None].to(call.key.dtype)
        return [Branch(self._hole(call), key=key, value=call.value, bias=call.bias)]

    def _rows_masks(self, call: AttentionCall) -> torch.Tensor:
        """[B, N] each row's image's mask at this grid (once per run and rows)."""
        def rows_masks() -> torch.Tensor:
            import torch

            masks = call.state.scratch_for(self.strategy)["masks"][self.site.level].to(call.query.device)
            return masks.index_select(0, torch.tensor(call.layout.images, device=call.query.device))

        return call.memo((NAME, "masks"), rows_masks)

    def _hole(self, call: AttentionCall) -> torch.Tensor:
        return self._rows_masks(call)[:, None, :, None].to(call.query.dtype)

    def _relevance(self, call: AttentionCall) -> torch.Tensor:
        """[B, N] u of each row, from its image's conditional row."""
        import torch
        import torch.nn.functional as F

        layout, block = call.layout, call.block
        module = block.module
        attn1, attn2 = getattr(module, "attn1", None), getattr(module, "attn2", None)
        plain = (getattr(module, "norm_type", None) == "layer_norm" and getattr(module, "pos_embed", None) is None
                 and not getattr(module, "only_cross_attention", False))
        if attn2 is None or not plain or block.encoder_hidden_states is None:
            raise RunError(f"{self.site.key}: PAIntA reads a transformer block of SD's form (layer norms, then "
                           f"self- and cross-attention on text); {type(module).__name__} here is not one")
        cond = [r for r in range(len(layout)) if layout.branches[r] == "cond" and layout.roles[r] == MAIN_ROLE]
        rows = torch.tensor(cond, device=call.query.device)
        b, h, nq, d = call.output.shape
        y = call.output.index_select(0, rows).transpose(1, 2).reshape(len(cond), nq, h * d)
        y = attn1.to_out[1](attn1.to_out[0](y.to(call.value.dtype))) / attn1.rescale_output_factor
        x = block.hidden_states.index_select(0, rows)
        q = attn2.to_q(module.norm2(x + y))
        k = attn2.to_k(block.encoder_hidden_states.index_select(0, rows))
        heads, exact = attn2.heads, torch.promote_types(q.dtype, torch.float32)  # theirs: fp32 logits
        q = q.view(len(cond), nq, heads, -1).transpose(1, 2).to(exact)
        k = k.view(len(cond), k.shape[1], heads, -1).transpose(1, 2).to(exact)
        probs = (q @ k.transpose(-1, -2) * attn2.scale).softmax(-1).mean(1)  # [n, N, 77]
        tokens = call.state.scratch_for(self.strategy)["tokens"]
        s = torch.stack([probs[i][:, tokens[layout.prompts[r]]].sum(-1) for i, r in enumerate(cond)])
        gh, gw = call.grid
        s = F.conv2d(s.view(len(cond), 1, gh, gw), smoothing_kernel(3, 0.5).to(s), padding="same").flatten(1)
        s = ((s - s.median(dim=1, keepdim=True).values) / s.max(dim=1, keepdim=True).values).clip(0, 1)
        m = self._rows_masks(call).index_select(0, rows).to(s)
        u_cond = m + (1 - m) * s
        by_image = {layout.images[r]: i for i, r in enumerate(cond)}
        pick = torch.tensor([by_image[layout.images[r]] for r in range(len(layout))], device=s.device)
        return u_cond.index_select(0, pick)


# ----------------------------------------------------------------------------- RASG
@dataclass(eq=False)
class RecordLogits(MapOp):
    """At a score site, in the guidance pass: keep the conditional rows' cross logits [B, h, N, 77]."""

    passes: frozenset[str] = field(default=frozenset({GUIDANCE}), kw_only=True)

    def edit_logits(self, call: AttentionCall, queries: slice, logits: torch.Tensor) -> torch.Tensor:
        call.state.scratch_for(self.strategy).setdefault("logits", []).append(logits[..., : call.num_own_keys])
        return logits


@dataclass(eq=False)
class RasgGradient(Prepared, LatentOp):
    """Each step, before the UNet: the score's gradient at z (the latent itself is left as it is)."""

    last_site: Site | None = field(default=None, kw_only=True)
    level: int = field(default=0, kw_only=True)
    centre: bool = field(default=False, kw_only=True)

    def guide(self, z: torch.Tensor, ctx: GuidanceView) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        state = ctx.state
        if self.last_site is None:
            raise RunError(f"strategies.{self.strategy}: RASG has no score sites")
        scratch = state.scratch_for(self.strategy)
        scratch["logits"] = []
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():  # pipelines run under no_grad
            ctx.denoise_cond(z, stop_after=self.last_site)
            maps = torch.cat(scratch.pop("logits"), dim=1).mean(1)  # [images, N, 77]: mean over all heads
            masks = scratch["masks"][self.level].to(maps)
            score = maps.new_zeros(())
            for i, r in enumerate(state.layout.cond_rows):
                target = masks[state.layout.images[r]]
                for j in scratch["tokens"][state.layout.prompts[r]]:
                    score = score - F.binary_cross_entropy_with_logits(maps[i, :, j] - 1.0, target)
            (grad,) = torch.autograd.grad(score, z)
        dims = tuple(range(1, grad.ndim))
        if self.centre:  # the diffusers port: per image, centred
            grad = (grad - grad.mean(dims, keepdim=True)) / grad.std(dims, keepdim=True)
        else:  # theirs: over everything, not centred
            grad = grad / grad.std()
        scratch["grad"] = grad.detach()
        return z.detach()


@dataclass(eq=False)
class RasgStep(PostStepOp):
    """Replaces the scheduler's DDIM step by theirs with the guidance as variance noise."""

    eta: float = field(default=0.1, kw_only=True)
    per_step_sigma: bool = field(default=True, kw_only=True)

    def apply(self, latents: torch.Tensor, ctx: StepView) -> torch.Tensor:
        import torch

        scheduler, eps, z = ctx.scheduler, ctx.model_output, ctx.sample
        refusal = f"strategies.{self.strategy}: RASG replaces a DDIM step; use sampler.scheduler=ddim"
        if eps is None:
            raise ConfigError(refusal)
        a_t, a_prev, prev = ddim_step_alphas(scheduler, ctx.state.timestep, refusal, dtype=torch.float64)
        grad = ctx.state.scratch_for(self.strategy).pop("grad", None)
        if grad is None:
            return latents
        t = int(ctx.state.timestep)
        sigma = 0.0
        if prev >= 0:  # their last step's sigma is NaN and its z is never used; here it adds no noise
            alphas = (scheduler.alphas if self.per_step_sigma else scheduler.alphas_cumprod).to(torch.float64)
            sigma = float(((1 - alphas[prev]) / (1 - alphas[t]) * (1 - alphas[t] / alphas[prev])).sqrt())
        s = self.eta * sigma
        exact = torch.promote_types(z.dtype, torch.float32)
        e, z, g = eps.to(exact), z.to(exact), grad.to(exact)
        x0 = (z - (1 - a_t).sqrt().to(exact) * e) / a_t.sqrt().to(exact)
        out = a_prev.sqrt().to(exact) * x0 + (1 - a_prev - s**2).sqrt().to(exact) * e + s * g
        return out.to(latents.dtype)


# ----------------------------------------------------------------------------- plan
@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    return [SPEC]


def _cross_sites(selector: str, sites: SiteTable, where: str) -> list[Site]:
    picked = select_sites(selector, sites)
    if not picked or any(s.kind != "cross" for s in picked) or len({s.level for s in picked}) != 1:
        raise ConfigError(f"{where}.rasg_sites='{selector}' must select cross sites of one grid, e.g. 'cross/4'")
    return picked


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: HDPainterParams, sites: SiteTable) -> list[Any] | None:
    if spec.name != NAME:
        return None
    where = f"strategies.{instance}"
    painted = self_attention_sites(params.painta_sites, sites, where) if params.painta else []
    scored = _cross_sites(params.rasg_sites, sites, where) if params.rasg else []
    prepared = dict(levels=tuple(sorted({s.level for s in painted + scored})), mask_mode=params.mask)
    until = params.painta_until

    def painting(state: RunView) -> bool:  # theirs switch PAIntA off once t <= 500
        return state.timestep is not None and state.timestep > until

    ops: list[Any] = [PaintaOp(instance, site=site, gates=(painting,), **prepared) for site in painted]
    if scored:
        ops += [RecordLogits(instance, site=site) for site in scored]
        ops.append(RasgGradient(instance, last_site=max(scored, key=sites.index), level=scored[0].level,
                                centre=params.grad_norm == "mean-std", **prepared))
        ops.append(RasgStep(instance, eta=params.rasg_eta, per_step_sigma=params.sigma == "per-step"))
    return ops
