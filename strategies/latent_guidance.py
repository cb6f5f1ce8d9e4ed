"""Cross-attention latent guidance: HarmonPaint's Attention Steer Loss (Eq. 8-9).

Before the noise prediction of each step where it is active (including the first):

    repeat `iterations` times:
        z <- z_t with grad
        run the UNet on the conditional rows (stopping right after the last read site)
        A   <- cross-attention probabilities [B, h, HW, 77] at each read site,
               averaged over heads and over the read sites of the same grid
        L_s <- sum over images of  mean over grids of  loss(A, M_f, tokens)
        z_t <- z_t - u,   u = alpha_k * grad_z L_s          (step_rule: paper, step_region: all)
    alpha_k = step_size * sqrt(linspace(1.0, 0.5, num_inference_steps)[k]),  k = step index

``step_rule`` and ``step_region`` offer other readings of the update (``strategies.latent_steps``):
a step normalized to an RMS latent change in units of the latent's std, and an update
restricted to the mask with a soft edge. The defaults are Eq. 9 as written.

The loss is pluggable (``strategies.guidance_losses``): ``steer`` (the pinned reading
of Eq. 8-9) or ``attend_excite``. Images are **summed**, not averaged, so each image gets
exactly the update it would get alone (the UNet treats rows independently) and the step
size does not depend on the batch size. The loss is computed in fp32 whatever the
model's dtype; the update is done in fp32 and cast back to the latent's dtype.

Fast path: only the read sites compute explicit probabilities (H*W x 77 per head), and
only in the guidance pass; with ``stop_early`` the pass ends right after the last read
site, since later layers cannot change the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import attnctl
from attnctl.errors import ConfigError, InputError, RunError
from attnctl.ops import LatentOp, ObserveOp, Op
from attnctl.params import StrategySpec
from attnctl.selectors import select_sites
from attnctl.sites import Site, SiteTable
from strategies.guidance_losses import GridMaps, get_loss
from strategies.latent_steps import STEP_REGIONS, STEP_RULES, is_fake, latent_update, soft_region, update_stats

if TYPE_CHECKING:
    import torch

    from attnctl.call import AttentionCall
    from attnctl.interfaces import GuidanceView, RunView

# torch is imported inside the functions that compute: discovering and validating strategies
# (``attnctl strategies``, recipe checks) then runs without loading it

NAME = "latent_guidance"
SCHEDULES = ("sqrt_linspace", "constant")


@dataclass
class LatentGuidanceParams:
    """Parameters of ``latent_guidance`` (defaults: HarmonPaint's pinned values)."""

    read_sites: str = field(
        default="cross/4,cross/2", metadata={"help": "cross-attention sites whose maps the loss reads (selector)"}
    )
    loss: str = field(default="steer", metadata={"help": "guidance loss: steer (Eq. 8-9) or attend_excite"})
    step_size: float = field(default=20.0, metadata={"help": "base step size of the latent update"})
    schedule: str = field(
        default="sqrt_linspace",
        metadata={"help": "sqrt_linspace: alpha_k = step_size*sqrt(linspace(1,0.5,N)[k]); constant: step_size"},
    )
    iterations: int = field(default=1, metadata={"help": "gradient updates per active step"})
    step_rule: str = field(
        default="paper",
        metadata={"help": "paper: u = alpha_k*grad (Eq. 9); normalized: u = alpha_k*std(z)*grad/rms(grad), "
                          "so step_size is an RMS latent change in units of the latent's std"},
    )
    step_region: str = field(
        default="all", metadata={"help": "all: update the whole latent (Eq. 9); mask: only the inpainted region"}
    )
    mask_edge: float = field(
        default=1.0, metadata={"help": "step_region mask: soft edge outside the mask, Gaussian sigma in latent cells"}
    )
    record_loss_after: bool = field(
        default=False, metadata={"help": "diagnostic: also compute the loss after each update (one more pass per step)"}
    )
    tokens: str | tuple[int, ...] = field(
        default="prompt",
        metadata={"help": "'prompt' (the prompt's own tokens, from token_indices) or a list of positions 1..76"},
    )
    token_scale: float = field(default=100.0, metadata={"help": "factor before the softmax over tokens"})
    eps: float = field(default=1e-4, metadata={"help": "epsilon in log(1 - A + eps)"})
    stop_early: bool = field(default=True, metadata={"help": "end the gradient pass after the last read site "
                                                                    "(eager forward; a compiled one runs to the end)"})

    def __post_init__(self) -> None:
        get_loss(self.loss)  # unknown names fail here, with the list of known ones
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: unknown '{self.schedule}'; use one of {', '.join(SCHEDULES)}")
        if self.step_size < 0:
            raise ConfigError(f"step_size must be >= 0, got {self.step_size}")
        if self.step_rule not in STEP_RULES:
            raise ConfigError(f"step_rule: unknown '{self.step_rule}'; use one of {', '.join(STEP_RULES)}")
        if self.step_region not in STEP_REGIONS:
            raise ConfigError(f"step_region: unknown '{self.step_region}'; use one of {', '.join(STEP_REGIONS)}")
        if self.step_rule == "normalized" and self.step_size > 1.0:
            raise ConfigError(
                f"step_size {self.step_size:g} with step_rule normalized moves the latent by {self.step_size:g} of its "
                "own standard deviation per step; that rule's step_size is an RMS change in units of std(z), "
                "e.g. 0.1 (the paper's 20 belongs to step_rule paper)"
            )
        if self.mask_edge < 0:
            raise ConfigError(f"mask_edge must be >= 0 (latent cells), got {self.mask_edge}")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be >= 1, got {self.iterations}; disable the instance instead")
        if self.token_scale <= 0 or self.eps <= 0:
            raise ConfigError(f"token_scale and eps must be > 0, got {self.token_scale} and {self.eps}")
        if isinstance(self.tokens, str):
            if self.tokens != "prompt":
                raise ConfigError(f"tokens: expected 'prompt' or a list of positions, got '{self.tokens}'")
        elif any(i < 1 for i in self.tokens):
            raise ConfigError(f"tokens: positions start at 1 (0 is the start token, which is dropped), got {list(self.tokens)}")


def step_size_at(params: LatentGuidanceParams, state: RunView) -> float:
    """alpha_k for the run state's current step."""
    import torch

    if params.schedule == "constant":
        return params.step_size
    n, k = state.num_inference_steps, state.step_index
    if n is None or k is None:
        raise RunError(
            f"latent_guidance: timestep {state.timestep} is not one of the scheduler's timesteps, so the "
            "step index of the sqrt_linspace schedule is unknown; use schedule: constant for this sampler"
        )
    return params.step_size * math.sqrt(float(torch.linspace(1.0, 0.5, n, dtype=torch.float64)[k]))


class _PassMaps:
    """Head-averaged maps of one guidance pass, summed per grid level."""

    def __init__(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.counts: dict[int, int] = {}
        self.masks: dict[int, torch.Tensor] = {}
        self.grids: dict[int, tuple[int, int]] = {}
        self.prompts: tuple[int, ...] = ()

    def add(self, call: AttentionCall, probs: torch.Tensor) -> None:
        state, level = call.state, call.site.level
        grid = state.grid(call.site)
        if probs.shape[2] != grid[0] * grid[1]:
            raise RunError(f"{call.site.key}: {probs.shape[2]} queries for a {grid[0]}x{grid[1]} grid")
        heads_mean = probs.float().mean(dim=1)  # [B, HW, L]
        self.sums[level] = heads_mean if level not in self.sums else self.sums[level] + heads_mean
        self.counts[level] = self.counts.get(level, 0) + 1
        self.masks.setdefault(level, call.mask())
        self.grids[level] = grid
        self.prompts = call.layout.prompts


@dataclass(eq=False)
class RecordMaps(ObserveOp):
    """At a read site, in the guidance pass: hand the probabilities to the running pass."""

    #: on a joint site the maps are the img>txt block, renormalized over the text (``call.text_probs``)
    joint_sites: ClassVar[bool] = True

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:
        maps = call.state.scratch_for(self.strategy).get("pass")
        if maps is not None:  # None: another instance's guidance pass
            maps.add(call, call.text_probs(probs))


@dataclass(eq=False)
class SteerLatent(LatentOp):
    """Gradient steps on z_t against the guidance loss, before the step's noise prediction."""

    params: LatentGuidanceParams = field(kw_only=True)
    read_sites: tuple[Site, ...] = field(kw_only=True)

    #: the read site that runs last (where the gradient pass may stop)
    last_site: Site = field(kw_only=True)

    def guide(self, z: torch.Tensor, ctx: GuidanceView) -> torch.Tensor:
        params = self.params
        alpha = step_size_at(params, ctx.state)
        history = ctx.state.scratch_for(self.strategy).setdefault("history", [])
        mask = self.latent_mask(z, ctx)
        weights = soft_region(mask, params.mask_edge) if params.step_region == "mask" else None
        region = mask if params.step_region == "mask" else None
        for it in range(params.iterations):
            loss, grad = self.loss_and_grad(z, ctx)
            update = latent_update(grad.float(), z.float(), alpha, params.step_rule, weights, region)
            z_new = (z.float() - update).to(z.dtype)
            if not is_fake(update):  # a memory/FLOP prediction runs on fake tensors: no values to log
                entry = {"step": ctx.state.step_index, "iteration": it, "alpha": alpha, "loss": float(loss),
                         **update_stats(update, z.float(), mask)}
                if params.record_loss_after:
                    entry["loss_after"] = float(self.loss_and_grad(z_new, ctx, with_grad=False)[0])
                history.append(entry)
            z = z_new
        return z

    @staticmethod
    def latent_mask(z: torch.Tensor, ctx: GuidanceView) -> torch.Tensor:
        """The binary inpainting mask of each row of ``z`` at the latent's resolution, ``[N, 1, h, w]``."""
        state = ctx.state
        masks = state.masks_for_rows(0, state.layout.cond_rows, z.device)
        return masks.view(z.shape[0], 1, *z.shape[2:])

    def loss_and_grad(self, z: torch.Tensor, ctx: GuidanceView,
                      with_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss at ``z`` (fp32 scalar, detached) and its gradient wrt ``z`` (None without ``with_grad``)."""
        import torch

        z = z.detach().requires_grad_(with_grad)
        scratch = ctx.state.scratch_for(self.strategy)
        scratch["pass"] = maps = _PassMaps()
        # pipelines run under no_grad; the loss, not only the UNet pass, needs a graph
        with torch.enable_grad():
            try:
                ctx.denoise_cond(z, stop_after=self.last_site if self.params.stop_early else None)
            finally:
                del scratch["pass"]
            loss = self.loss_from(maps, ctx.state)
        if not with_grad:
            return loss.detach(), None
        if not loss.requires_grad:
            raise RunError(
                f"strategies.{self.strategy}: the guidance loss has no gradient (is autograd off, e.g. "
                "torch.inference_mode() around the pipeline?); call the pipeline under torch.no_grad() instead"
            )
        grad = torch.autograd.grad(loss, z, allow_unused=True)[0]
        return loss.detach(), (torch.zeros_like(z) if grad is None else grad)

    def loss_from(self, maps: _PassMaps, state: RunView) -> torch.Tensor:
        """L = sum over images of mean over grids of the loss of that grid (fp32)."""
        import torch

        if not maps.sums:
            raise RunError(
                f"strategies.{self.strategy}: the guidance pass recorded no cross-attention map; "
                "are the read sites' processors replaced or their ops gated differently?"
            )
        loss_fn = get_loss(self.params.loss)
        per_grid = []
        for level in sorted(maps.sums):
            probs = maps.sums[level] / maps.counts[level]
            tokens = self.token_mask(state, maps.prompts, probs.shape[-1], probs.device)
            grid = GridMaps(probs, maps.masks[level], maps.grids[level], tokens, self.params.token_scale, self.params.eps)
            per_grid.append(loss_fn(grid).float())
        return torch.stack(per_grid).mean(dim=0).sum()

    def token_mask(self, state: RunView, prompts: tuple[int, ...], length: int, device: Any) -> torch.Tensor:
        """[B, L] bool: the text positions the loss sums over, per row."""
        import torch

        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            if self.params.tokens == "prompt":
                if prompt >= len(state.token_indices):
                    raise InputError(
                        f"strategies.{self.strategy} (tokens: prompt) needs the positions of prompt {prompt}'s "
                        "tokens: pass token_indices=[[1, ..., n], ...] (one list per prompt) to Controller.run"
                    )
                positions = state.token_indices[prompt]
            else:
                positions = self.params.tokens
            bad = [p for p in positions if not 1 <= p < length]
            if bad:
                raise InputError(
                    f"strategies.{self.strategy}: token positions {bad} are outside 1..{length - 1} "
                    "(0 is the start token)"
                )
            mask[row, list(positions)] = True
        return mask.to(device)


SPEC = StrategySpec(
    name=NAME,
    summary="Latent guidance from cross-attention maps before each noise prediction (Attention Steer Loss)",
    params=LatentGuidanceParams,
)


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    """Provide ``latent_guidance``."""
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: LatentGuidanceParams, sites: SiteTable) -> list[Op] | None:
    """A map-recording observe op at each read site and one latent op."""
    if spec.name != NAME:
        return None
    read = select_sites(params.read_sites, sites)
    not_cross = [s.key for s in read if "img>txt" not in s.blocks]
    if not_cross:
        raise ConfigError(
            f"strategies.{instance}.read_sites: {', '.join(not_cross)} are self-attention sites; the loss "
            "reads cross-attention maps over text tokens, select cross sites (e.g. 'cross/4,cross/2')"
        )
    ops: list[Op] = [RecordMaps(instance, site=s) for s in read]
    # a UNet's table lists cross sites in execution order, a transformer's every site
    ops.append(SteerLatent(instance, params=params, read_sites=tuple(read), last_site=max(read, key=sites.index)))
    return ops
