"""``visual_style_prompting``: swapping self-attention (Visual Style Prompting, Jeong et al., arXiv 2402.12974).

As the authors' code computes it (naver-ai/Visual-Style-Prompting). A style reference stands
beside the main images, one row per CFG branch shared by all of them (their row 0 of each
half). At the selected self-attention sites and steps every row keeps its queries and takes
the keys and values of the reference row of its own branch (the reference keeps its own)::

    out_r = softmax(Q_r K_ref^T / sqrt(d)) V_ref

The reference is generated from ``reference_prompt`` (rows driven ``free`` from their own
seeded noise) or is a real image (``noised``: ``add_noise(z0, noise, t)`` each step with fresh
noise, its text ``reference_prompt`` if given). Default sites: the self-attention of the last
up block with attention (SDXL ``up_blocks.1``: their ``ACTIVATE_LAYER_CANDIDATE[128:140]``;
SD 1.x ``up_blocks.3``; the SD 1.5 port also takes the mid block: ``self@mid,self@up/1``).
Advanced sampling (a prediction op): guidance ``early_guidance_scale`` (their 20) on the main
rows while ``step < early_steps`` (their ``i < 3``), and on a generated reference too, as theirs.

Deviations: (1) a real image is encoded once with the latent mean (theirs: a posterior sample
each step) and re-noised from a generator seeded ``reference_seed`` (theirs: the global RNG);
(2) their colour calibration (for a real reference: while 150 > t > 100 their DDIM step matches
each row's predicted x0 to the reference's per channel) is a post-step op that redoes the
step, so it needs the DDIM scheduler and eta 0 (their setting).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import attnctl
from attnctl.errors import ConfigError
from attnctl.layout import MAIN_ROLE
from attnctl.ops import MAIN, ProjectionOp
from attnctl.params import StrategySpec, help_text as _h
from attnctl.rows import RowOp, RowSpec
from attnctl.sites import Site, SiteTable
from attnctl.step_ops import PostStepOp, PredictionOp
from strategies._attention_sites import self_attention_sites
from strategies._ddim import ddim_step_alphas
from strategies._images import open_image

if TYPE_CHECKING:
    import torch

    from attnctl.call import AttentionCall
    from attnctl.step_ops import StepView

NAME = "visual_style_prompting"


@dataclass(frozen=True)
class VisualStylePromptingParams:
    """Parameters of ``visual_style_prompting`` (defaults: the authors')."""

    reference_prompt: str | None = field(default=None, metadata=_h(
        "text of the style reference: generates it, or conditions reference_image"))
    reference_image: str | None = field(default=None, metadata=_h("path of a real style reference image"))
    reference_seed: int = field(default=0, metadata=_h("seed of the reference's initial (or re-noising) noise"))
    sites: str | None = field(default=None, metadata=_h(
        "self-attention sites (selector; null: those of the last up block with attention)"))
    start_step: int = field(default=0, metadata=_h("first step index it swaps at"))
    end_step: int | None = field(default=None, metadata=_h("step index it stops before (null: the last step)"))
    advanced_sampling: bool | None = field(default=None, metadata=_h(
        "early_guidance_scale in the first early_steps (null: on for a generated reference, off for an image)"))
    early_guidance_scale: float = field(default=20.0, metadata=_h("guidance scale of the early steps"))
    early_steps: int = field(default=3, metadata=_h("number of early steps"))
    keep_reference: bool = field(default=False, metadata=_h("publish the reference's last latent in row_outputs"))
    color_calibration: bool | None = field(default=None, metadata=_h(
        "match each image's predicted x0 to the reference's, per channel, while start > t > start - window "
        "(null: on for a real reference, as their real-image script)"))
    color_cal_start_t: float = field(default=150.0, metadata=_h("colour calibration acts while t < this"))
    color_cal_window: float = field(default=50.0, metadata=_h("... and t > color_cal_start_t - this"))

    def __post_init__(self) -> None:
        if not (self.reference_prompt or "").strip() and not (self.reference_image or "").strip():
            raise ConfigError("give reference_prompt (a generated style reference, e.g. reference_prompt='a cat, "
                              "in low-poly style') or reference_image (the path of a real one)")
        end = self.start_step + 1 if self.end_step is None else self.end_step
        if self.start_step < 0 or end <= self.start_step:
            raise ConfigError(f"need 0 <= start_step < end_step; got start_step={self.start_step}, "
                              f"end_step={self.end_step}")
        if self.early_steps < 0 or not (math.isfinite(self.early_guidance_scale) and self.early_guidance_scale > 0):
            raise ConfigError(f"need early_steps >= 0 and a finite early_guidance_scale > 0; got early_steps="
                              f"{self.early_steps}, early_guidance_scale={self.early_guidance_scale}")

    @property
    def advanced(self) -> bool:
        """Whether the early guidance runs (their vsp_script: yes; vsp_real_script: no)."""
        on = not (self.reference_image or "").strip() if self.advanced_sampling is None else self.advanced_sampling
        return bool(on) and self.early_steps > 0


SPEC = StrategySpec(NAME, "Visual Style Prompting: self-attention keys/values swapped for a style reference's",
                    VisualStylePromptingParams)


@dataclass(eq=False)
class ReferenceKV(ProjectionOp):
    """Own K,V <- those of the reference row of the same branch (their ``swapping_attention``)."""

    def project(self, call: AttentionCall) -> None:
        call.set_own_kv(call.take(call.key, self.strategy), call.take(call.value, self.strategy))


@dataclass(eq=False)
class EarlyGuidance(PredictionOp):
    """The main rows' ``u + scale (c - u)`` (their ``i < 3``: ``20.0``)."""

    scale: float = field(default=20.0, kw_only=True)

    def combine(self, eps: torch.Tensor, ctx: StepView) -> torch.Tensor:
        from attnctl.row_driver import cfg_prediction  # torch: not at import (listing strategies stays light)

        return cfg_prediction(eps, ctx.state.layout, MAIN_ROLE, self.scale)

    def guidance_scale(self, ctx: StepView) -> float:
        return self.scale  # theirs guide every row of the batch at 20, a generated reference's too


@dataclass(eq=False)
class ColorCalibration(PostStepOp):
    """Their real-image DDIM step: each image's predicted x0 set to the per-channel mean and standard
    deviation (unbiased, over the grid) of the reference's, whose x0 comes from its conditional
    prediction, then ``sqrt(a') x0 + sqrt(1 - a') eps`` with the step's own prediction (eta 0)."""

    def apply(self, latents: torch.Tensor, ctx: StepView) -> torch.Tensor:
        eps, z = ctx.model_output, ctx.sample
        refusal = (f"strategies.{self.strategy}.color_calibration redoes a DDIM step; use sampler.scheduler=ddim "
                   "(or color_calibration: false)")
        if eps is None:
            raise ConfigError(refusal)
        a_t, a_prev, _ = ddim_step_alphas(ctx.scheduler, ctx.state.timestep, refusal, device=z.device)

        def x0(sample, pred):
            return (sample - (1 - a_t) ** 0.5 * pred) / a_t ** 0.5

        ref = x0(ctx.row_latents(self.strategy)[:1].to(z), ctx.row_prediction(self.strategy, "cond")[:1].to(z))
        own = x0(z, eps)
        dims = (2, 3)
        own = (own - own.mean(dims, keepdim=True)) / (own.std(dims, keepdim=True) + 1e-8)
        own = own * ref.std(dims, keepdim=True) + ref.mean(dims, keepdim=True)
        return (a_prev ** 0.5 * own + (1 - a_prev) ** 0.5 * eps).to(latents.dtype)


@dataclass(frozen=True)
class _Steps:
    """Gate ``start <= step index < end``, readable in the run report."""

    start: int
    end: float

    def __call__(self, state: Any) -> bool:
        return state.step_index is not None and self.start <= state.step_index < self.end

    def __str__(self) -> str:
        return f"{self.start} <= step < {self.end}"


def default_sites(sites: SiteTable) -> list[Site]:
    """The self-attention sites of the last up block that has attention, in execution order."""
    ups = [s for s in sites.of_kind("self") if s.stage == "up"]
    if not ups:
        raise ConfigError("this model has no self-attention in its up blocks; give sites (a selector)")
    block = ".".join(ups[-1].name.split(".")[:2]) + "."  # up_blocks.1. (SDXL), up_blocks.3. (SD 1.x)
    return [s for s in ups if s.name.startswith(block)]


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: VisualStylePromptingParams, sites: SiteTable):
    if spec.name != NAME:
        return None
    # one reference for the whole batch (their row 0 of each half), from its own seed
    where = f"strategies.{instance}"
    common = {"role": instance, "prompt": (params.reference_prompt or "").strip() or None, "per_image": False,
              "noise_seed": params.reference_seed, "output": params.keep_reference}
    if (params.reference_image or "").strip():  # their prepare_img_latents(..., generator=None): new noise each step
        image = open_image(params.reference_image, f"{where}.reference_image")
        row = RowSpec(driver="noised", image=image, fresh_noise=True, **common)
    else:
        row = RowSpec(driver="free", **common)
    ops: list = [RowOp(instance, row=row)]
    if params.advanced:
        ops.append(EarlyGuidance(instance, scale=params.early_guidance_scale, gates=(_Steps(0, params.early_steps),)))
    real = bool((params.reference_image or "").strip())
    if real if params.color_calibration is None else params.color_calibration:
        start, end = params.color_cal_start_t, params.color_cal_start_t - params.color_cal_window

        def calibrating(state) -> bool:  # theirs: fix_traj_t_start > t > fix_traj_t_end
            return state.timestep is not None and start > state.timestep > end

        ops.append(ColorCalibration(instance, gates=(calibrating,)))
    chosen = self_attention_sites(params.sites, sites, where) if params.sites else default_sites(sites)
    due = _Steps(params.start_step, math.inf if params.end_step is None else params.end_step)
    # main pass only: it reads another row, which a guidance pass (conditional main rows only) does not have
    return ops + [ReferenceKV(instance, site=s, gates=(due,), passes=frozenset({MAIN})) for s in chosen]
