"""``pag``: perturbed-attention guidance (Ahn et al., arXiv 2403.17377), as diffusers computes it.

A perturbed copy of each conditional row (same latent, same text) is added to the batch. At
the selected self-attention sites its attention map is the identity, so its output there is
``to_out(V)``; every other row attends as usual. The noise predictions combine as

    eps = eps_u + g (eps_c - eps_u) + s (eps_c - eps_ptb)      (CFG on)
    eps = eps_c + s (eps_c - eps_ptb)                          (CFG off)

(the last term is a guidance term, so it adds to whatever else guides the step, in order).

with ``s = max(scale - adaptive_scale (1000 - t), 0)`` when ``adaptive_scale > 0``. This is
what ``StableDiffusionPAGInpaintPipeline`` does at ``pag_applied_layers`` (``mid`` by
default), on any attnctl-supported pipeline and next to other strategies.

``perturbation: seg`` makes it smoothed energy guidance (Hong, arXiv 2408.00760) as the
authors' pipeline computes it: the perturbed rows keep attention but their queries are
Gaussian-blurred over the token grid (``blur_sigma`` > 9999: replaced by their mean, the
infinite blur), with ``scale`` as ``seg_scale``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import attnctl
from attnctl.errors import ConfigError
from attnctl.ops import Branch, BranchOp, ProjectionOp
from attnctl.params import StrategySpec
from attnctl.rows import RowOp, RowSpec
from attnctl.step_ops import GuidanceTermOp
from strategies._attention_sites import self_attention_sites

if TYPE_CHECKING:
    import torch

NAME = "pag"
PERTURBATIONS = ("identity", "seg")
INFINITE_BLUR = 9999.0  # the authors' threshold: a larger sigma means the mean over the grid


@dataclass(frozen=True)
class PAGParams:
    """Parameters of ``pag`` (defaults: diffusers' PAG pipelines)."""

    sites: str = field(default="self@mid", metadata={"help": "self-attention sites perturbed (pag_applied_layers)"})
    scale: float = field(default=3.0, metadata={"help": "guidance scale of the perturbation (pag_scale / seg_scale)"})
    adaptive_scale: float = field(default=0.0, metadata={"help": "scale - adaptive_scale * (1000 - t), floored at 0"})
    perturbation: str = field(default="identity", metadata={"help": "identity (PAG) or seg (blurred queries)"})
    blur_sigma: float = field(default=9999999.0, metadata={"help": "seg: Gaussian sigma in tokens; > 9999 = mean"})

    def __post_init__(self) -> None:
        if self.perturbation not in PERTURBATIONS:
            raise ConfigError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {self.perturbation!r}")
        if self.blur_sigma <= 0:
            raise ConfigError(f"blur_sigma must be positive, got {self.blur_sigma}")


SPEC = StrategySpec(NAME, "perturbed-attention guidance (PAG) or smoothed energy guidance (SEG)", PAGParams)


@dataclass(eq=False)
class IdentityAttention(BranchOp):
    """The perturbed rows' attention is the identity: their output is their own values."""

    def main_weight(self, call):
        return 1 - call.on_rows(self.strategy).to(call.value.dtype)

    def branches(self, call):
        on = call.on_rows(self.strategy).to(call.value.dtype)
        # own values only, not keys other ops appended
        return [Branch(on, identity=True, value=call.own_value, rows=tuple(call.rows_of(self.strategy)))]


@dataclass(eq=False)
class BlurredQueries(ProjectionOp):
    """SEG: the perturbed rows' queries blurred over the token grid (the mean for an infinite blur)."""

    sigma: float = field(default=INFINITE_BLUR * 1000, kw_only=True)

    def project(self, call):
        rows = call.rows_of(self.strategy)
        query = call.query.clone()
        query[rows] = self._blur(call, call.query[rows])
        call.set_query(query)

    def _blur(self, call, q):
        """On the grid of channels ``[n, heads * d, H, W]``, as the authors' processor blurs."""
        import torch.nn.functional as F

        n, heads, tokens, d = q.shape
        h, w = call.state.grid(call.site)
        grid = q.permute(0, 1, 3, 2).reshape(n, heads * d, h, w)
        if self.sigma > INFINITE_BLUR:
            grid = grid.mean(dim=(-2, -1), keepdim=True).expand_as(grid)
        else:
            size = math.ceil(6 * self.sigma) + 1 - math.ceil(6 * self.sigma) % 2
            size = min(size, w - (w % 2 - 1))  # as theirs: at most the grid's width (+1 when even)
            kernel = _gaussian_kernel(size, self.sigma, grid).expand(heads * d, 1, size, size)
            pad = size // 2
            grid = F.conv2d(F.pad(grid, (pad, pad, pad, pad), mode="reflect"), kernel, groups=heads * d)
        return grid.reshape(n, heads, d, tokens).permute(0, 1, 3, 2)


def _gaussian_kernel(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    """A normalized 2-D Gaussian ``[size, size]``: the outer product of the 1-D one, made in fp32 and
    cast to ``like``'s dtype before the product (the authors' order)."""
    import torch

    x = torch.linspace(-(size - 1) * 0.5, (size - 1) * 0.5, steps=size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    g = (pdf / pdf.sum()).to(device=like.device, dtype=like.dtype)
    return torch.mm(g[:, None], g[None, :])


@dataclass(eq=False)
class PerturbedGuidance(GuidanceTermOp):
    """The term ``s (eps_c - eps_ptb)`` per image, added to the prediction (CFG's, or the conditional one)."""

    params: Any = field(default=None, kw_only=True)

    def term(self, eps, base, ctx):
        import torch

        lay, p = ctx.state.layout, self.params
        scale = p.scale
        if p.adaptive_scale > 0:
            scale = max(p.scale - p.adaptive_scale * (1000 - ctx.timestep), 0)
        out = []
        for image in range(lay.num_images):
            cond = next(r for r in lay.cond_rows if lay.images[r] == image)
            out.append(scale * (eps[cond] - eps[lay.partner(cond, self.strategy)]))
        return torch.stack(out)


@attnctl.hookimpl
def attnctl_add_strategies():
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: PAGParams, sites):
    if spec.name != NAME:
        return None
    picked = self_attention_sites(params.sites, sites, f"strategies.{instance}")
    row = RowOp(instance, row=RowSpec(instance, driver="shared", branches=("cond",)))
    if params.perturbation == "identity":
        perturb = [IdentityAttention(instance, site=s) for s in picked]
    else:
        perturb = [BlurredQueries(instance, site=s, sigma=params.blur_sigma) for s in picked]
    return [row, *perturb, PerturbedGuidance(instance, params=params)]
