"""``attend_excite``: Attend-and-Excite (Chefer et al. 2023) as the authors' pipeline computes it.

Before the noise prediction of step i (of N), per image, on its conditional row::

    A   = cross-attention probabilities at the read sites (one grid), mean over all their heads  [HW, 77]
    m_k = max over pixels of G * reflect_pad_1(softmax(100 A[:, 1:last])[:, k - 1])  (selected tokens k)
    L   = max_k max(0, 1 - m_k),   s_i = scale_factor * sqrt(linspace(*scale_range, N)[i])
    if i in thresholds and L > 1 - thr:   repeat {L = L(z); if L != 0: z -= s_i grad L}
                                          while L > 1 - thr, at most max_refinement_steps; then L = L(z)
    if i < max_iter_to_alter and L != 0:  z -= s_i grad L

Quirks kept: ``last`` drops position 76, not EOT (``eot``: stop before the prompt's EOT, their
SD 2.1 switch); G weighs offsets by exp(-(d / (2 sigma))^2) and the padding is 1 whatever the
kernel size; ties between tokens go to the first (Python's max); max(0, x) has no gradient at 0.
Rows of a UNet pass do not mix, so images run batched, each with its own stopping; the first
refinement pass reuses the step's first pass (same z). Maps and loss are fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import attnctl
from attnctl.errors import ConfigError, InputError, RunError
from attnctl.ops import LatentOp, ObserveOp, Op
from attnctl.params import StrategySpec, help_text as _h
from attnctl.selectors import select_sites
from attnctl.sites import Site, SiteTable
from strategies._smoothing import smoothing_kernel

if TYPE_CHECKING:
    import torch

    from attnctl.call import AttentionCall
    from attnctl.interfaces import GuidanceView, RunView

NAME = "attend_excite"
_FIX = {"scale_range": "[start, end], e.g. [1.0, 0.5]", "last_token": "drop_last or eot", "sigma": "a value > 0",
        "thresholds": "{step index: target max attention in [0, 1]}, e.g. {0: 0.05}",
        "kernel_size": "an odd size, e.g. 3", "max_refinement_steps": "a count >= 1"}


@dataclass
class AttendExciteParams:
    """Parameters of ``attend_excite`` (defaults: the authors' pipeline; ``tokens`` has none)."""

    read_sites: str = field(default="cross/4", metadata=_h("cross sites of one grid (cross/4: 16x16 at 512 px)"))
    tokens: str | tuple[int, ...] = field(default=(), metadata=_h("positions to excite (1 = first token) or 'prompt'"))
    scale_factor: float = field(default=20.0, metadata=_h("s_i = scale_factor * sqrt(linspace(*scale_range, N)[i])"))
    scale_range: tuple[float, ...] = field(default=(1.0, 0.5), metadata=_h("[start, end] of that linspace"))
    max_iter_to_alter: int = field(default=25, metadata=_h("the final update runs at steps i < this"))
    thresholds: dict = field(default_factory=lambda: {0: 0.05, 10: 0.5, 20: 0.8},
                             metadata=_h("step index -> refine while L > 1 - threshold"))
    max_refinement_steps: int = field(default=20, metadata=_h("most refinement iterations in a step"))
    sigma: float = field(default=0.5, metadata=_h("sigma of the smoothing kernel, exp(-(d/(2 sigma))^2)"))
    kernel_size: int = field(default=3, metadata=_h("odd size of the smoothing kernel (the padding stays 1)"))
    smooth: bool = field(default=True, metadata=_h("smooth each token's map before its max"))
    last_token: str = field(default="drop_last", metadata=_h("drop_last: softmax over 1..75; eot: over 1..n (SD 2.1)"))

    def __post_init__(self) -> None:
        if not self.tokens or isinstance(self.tokens, str) and self.tokens != "prompt":
            raise ConfigError(f"tokens: give the positions to excite, e.g. [2, 5] (1 = the prompt's first token; "
                              f"the authors pick the nouns), or 'prompt' for all of its tokens; got {self.tokens!r}")
        if not isinstance(self.tokens, str) and min(self.tokens) < 1:
            raise ConfigError(f"tokens: positions start at 1 (0 is the start token), got {list(self.tokens)}")
        try:
            self.thresholds = {int(k): float(v) for k, v in self.thresholds.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"thresholds: {self.thresholds} is not valid; use {_FIX['thresholds']}") from None
        ok = {"scale_range": len(self.scale_range) == 2, "last_token": self.last_token in ("drop_last", "eot"),
              "thresholds": all(0 <= v <= 1 for v in self.thresholds.values()), "sigma": self.sigma > 0,
              "kernel_size": self.kernel_size > 0 and self.kernel_size % 2 == 1,
              "max_refinement_steps": self.max_refinement_steps >= 1}
        for key in (k for k, good in ok.items() if not good):
            raise ConfigError(f"{key}: {getattr(self, key)!r} is not valid; use {_FIX[key]}")


@dataclass(eq=False)
class RecordProbs(ObserveOp):
    """At a read site, in this instance's guidance pass: add up the maps of every head."""

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:
        acc = call.state.scratch_for(self.strategy).get("pass")
        if acc is not None:  # None: another instance's guidance pass
            maps = probs[..., : call.num_own_keys].float()
            acc["sum"] = maps.sum(dim=1) + acc.get("sum", 0)
            acc["count"], acc["grid"] = acc.get("count", 0) + maps.shape[1], call.state.grid(call.site)


@dataclass(eq=False)
class ExciteLatent(LatentOp):
    """Refinement and update of z before the step's noise prediction."""

    params: AttendExciteParams = field(kw_only=True)
    last_site: Site = field(kw_only=True)

    def guide(self, z: torch.Tensor, ctx: GuidanceView) -> torch.Tensor:
        import numpy as np
        import torch

        p, (i, n) = self.params, (ctx.state.step_index, ctx.state.num_inference_steps)
        if i is None or n is None:
            raise RunError(f"strategies.{self.strategy}: timestep {ctx.timestep} is not in the scheduler's timesteps")
        s = float(p.scale_factor * np.sqrt(np.linspace(p.scale_range[0], p.scale_range[1], n)[i]))

        def step(z, grad, rows):  # z - s * grad (fp32) on the images ``rows``
            return torch.where(rows.to(z.device)[:, None, None, None], (z.float() - s * grad.float()).to(z.dtype), z)

        loss, grad = self.loss_and_grad(z, ctx)
        start, iters = loss.tolist(), torch.zeros(len(loss), dtype=torch.long, device=loss.device)
        if i in p.thresholds:
            active = loss > 1.0 - p.thresholds[i]
            while active.any():
                iters += active.long()
                z = step(z, grad, active & (loss != 0))
                active &= (loss > 1.0 - p.thresholds[i]) & (iters < p.max_refinement_steps)  # on the loss before
                loss, grad = self.loss_and_grad(z, ctx)  # next iteration's pass; an image's last is its final pass
        if i < p.max_iter_to_alter:
            z = step(z, grad, loss != 0)
        history = ctx.state.scratch_for(self.strategy).setdefault("history", [])
        history.append({"step": i, "step_size": s, "loss_start": start, "iterations": iters.tolist(), "loss": loss.tolist()})
        ctx.state.publish(self.strategy, history)  # RunResult.results[instance] after the run
        return z

    def loss_and_grad(self, z: torch.Tensor, ctx: GuidanceView) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image losses [N] (detached) at ``z``, and the gradient of each image's loss on its row."""
        import torch

        z, scratch = z.detach().requires_grad_(True), ctx.state.scratch_for(self.strategy)
        scratch["pass"] = acc = {}
        with torch.enable_grad():  # pipelines run under no_grad
            try:
                ctx.denoise_cond(z, stop_after=self.last_site)  # later layers cannot change the maps
            finally:
                del scratch["pass"]
            if "sum" not in acc:
                raise RunError(f"strategies.{self.strategy}: the guidance pass recorded no cross-attention map")
            loss = self.losses(acc["sum"] / acc["count"], acc["grid"], ctx.state)
            grad = torch.autograd.grad(loss.sum(), z, allow_unused=True)[0]  # rows do not mix
        return loss.detach(), torch.zeros_like(z) if grad is None else grad

    def losses(self, maps: torch.Tensor, grid: tuple[int, int], state: RunView) -> torch.Tensor:
        """max_k max(0, 1 - m_k) of each image, from its averaged maps ``maps`` [N, HW, 77]."""
        import torch
        import torch.nn.functional as F

        p, out, words_needed = self.params, [], self.params.tokens == "prompt" or self.params.last_token == "eot"
        for row, prompt in enumerate(state.layout.prompts[r] for r in state.layout.cond_rows):
            if words_needed and prompt >= len(state.token_indices):
                raise InputError(f"strategies.{self.strategy}: tokens: prompt and last_token: eot need the prompt's "
                                 "token positions: pass token_indices (one list per prompt) to Controller.run")
            words = state.token_indices[prompt] if words_needed else []
            last = max(words) + 1 if p.last_token == "eot" else maps.shape[-1] - 1
            tokens = list(words if p.tokens == "prompt" else p.tokens)
            if max(tokens) >= last:
                raise InputError(f"strategies.{self.strategy}: tokens {tokens} must lie in 1..{last - 1} "
                                 f"(last_token: {p.last_token})")
            a = torch.softmax(maps[row, :, 1:last] * 100, dim=-1)[:, [k - 1 for k in tokens]].T
            a = a.reshape(len(tokens), 1, *grid)
            if p.smooth:
                a = F.conv2d(F.pad(a, (1, 1, 1, 1), mode="reflect"), smoothing_kernel(p.kernel_size, p.sigma).to(a))
            hinge = 1.0 - a.flatten(1).amax(dim=1)
            hinge = torch.where(hinge > 0, hinge, torch.zeros_like(hinge))
            out.append(hinge[int(hinge.detach().argmax())])  # argmax: the first maximal token
        return torch.stack(out)


SPEC = StrategySpec(NAME, "Attend-and-Excite (authors' pipeline): excite the chosen tokens' cross-attention",
                    AttendExciteParams)


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: AttendExciteParams, sites: SiteTable) -> list[Op] | None:
    """An observe op at each read site; the latent op, gated to the steps where it can move z."""
    if spec.name != NAME:
        return None
    read = select_sites(params.read_sites, sites)
    if any(s.kind != "cross" for s in read) or len({s.level for s in read}) > 1:
        raise ConfigError(f"strategies.{instance}.read_sites: select cross-attention sites of one grid, e.g. "
                          f"'cross/4' (16x16 at 512 px); got {', '.join(s.key for s in read)}")

    def due(state: RunView) -> bool:  # other steps get no guidance pass at all
        i = state.step_index
        return i is None or i < params.max_iter_to_alter or i in params.thresholds

    return [*(RecordProbs(instance, site=s) for s in read),
            ExciteLatent(instance, gates=(due,), params=params, last_site=max(read, key=lambda s: s.index))]
