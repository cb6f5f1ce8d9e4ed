"""``self_pca`` probe: the structure in self-attention, as the top-3 PCA components in RGB.

At the chosen self-attention sites (default ``self/2``: the latent/2 grid, 32x32 for a
512x512 image) and steps, an ``ObserveOp`` reads the effective self-attention map over the
site's own (image-token) keys, averages it over heads and over the sites of one grid, for
the conditional rows of the main pass. When the step ends, each image's ``HW x HW`` map is
reduced to its top-3 principal components (rows = query patches as observations, their
attention over the key patches as features; centred), which become the red, green and blue
channels of an ``H x W`` picture: patches that attend alike get alike colours. Early steps
show the layout, late ones the detail (the reading of HarmonPaint's Fig. 2).

**Cost.** This probe materializes the ``HW x HW`` map at every read site and chosen step
(an explicit softmax instead of the fused kernel, ``4 * heads * HW^2`` bytes per image
and site) and keeps one such map per image and grid while a step runs; at the latent/2
grid of a 512x512 SD1.5 run that is 8 x 1024 x 1024 per call. Read few steps, and avoid
the full-resolution grid (``self/1``, 4096 tokens at 512x512) unless you need it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import attnctl
from attnctl.ops import MAIN, ObserveOp
from attnctl.params import StrategySpec
from attnctl.sites import SiteTable
from strategies._attention_sites import self_attention_sites
from strategies._probe_common import (
    STEPS_HELP, AtSteps, StepChoice, StepSums, cond_rows, finished_collectors, note_site, run_collector, step_label,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from attnctl.call import AttentionCall

NAME = "self_pca"
COMPONENTS = 3
#: above this many tokens the components come from subspace iteration instead of a full SVD
EXACT_LIMIT = 1024


@dataclass
class SelfPcaParams:
    """Parameters of the ``self_pca`` probe."""

    sites: str = field(default="self/2", metadata={
        "help": "self-attention sites to read (selector); materializes HW x HW maps there, costs more than cross_maps"})
    steps: str | tuple[int, ...] = field(default="spread:5", metadata={"help": STEPS_HELP})

    def __post_init__(self) -> None:
        StepChoice.parse(self.steps, "steps")


@dataclass
class SelfPca:
    """What the ``self_pca`` probe measured in one run.

    Attributes:
        steps: (step index, timestep) of each recorded step, in run order.
        grids: level -> token grid (H, W).
        sites: level -> the site keys averaged at that grid.
        rgb: (step index, level) -> image -> ``[H, W, 3]`` float32 in [0, 1]: each component
            scaled to [0, 1] over the image's patches.
        components: same keys -> ``[H, W, 3]`` float32: the raw component scores.
        explained: same keys -> ``[3]``: the share of the map's variance each component holds.
    """

    steps: list[tuple[int, float]] = field(default_factory=list)
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    sites: dict[int, list[str]] = field(default_factory=dict)
    rgb: dict[tuple[int, int], dict[int, np.ndarray]] = field(default_factory=dict)
    components: dict[tuple[int, int], dict[int, np.ndarray]] = field(default_factory=dict)
    explained: dict[tuple[int, int], dict[int, np.ndarray]] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """Every number as JSON-ready lists."""
        return {
            "kind": NAME,
            "steps": [{"step": s, "timestep": t} for s, t in self.steps],
            "grids": {str(level): list(grid) for level, grid in sorted(self.grids.items())},
            "sites": {str(level): keys for level, keys in sorted(self.sites.items())},
            "pca": [
                {"step": step, "level": level, "image": image,
                 "explained": self.explained[(step, level)][image].astype("float64").round(7).tolist(),
                 "components": array.astype("float64").round(7).tolist()}
                for (step, level), by_image in sorted(self.components.items())
                for image, array in sorted(by_image.items())
            ],
        }


def top_components(x: torch.Tensor, k: int = COMPONENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``[n, k]`` of the rows of ``x`` [n, f] on its top-``k`` principal axes, and their variance shares.

    Rows are centred; each component's sign makes its scores' third moment positive (so
    colours do not flip between steps at random). Deterministic: subspace iteration starts
    from a fixed local generator, never the global one.
    """
    import torch

    x = x.double()
    x = x - x.mean(dim=0, keepdim=True)
    total = (x * x).sum().clamp_min(1e-300)
    n, f = x.shape
    k_eff = min(k, n, f)
    if f <= EXACT_LIMIT:
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
    else:
        start = torch.randn(f, k + 10, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
        q, _ = torch.linalg.qr(start.to(x.device))
        for _ in range(24):
            q, _ = torch.linalg.qr(x.T @ (x @ q))
        u, s, _ = torch.linalg.svd(x @ q, full_matrices=False)
    scores = u[:, :k_eff] * s[:k_eff]
    signs = torch.sign((scores**3).sum(dim=0))
    scores = scores * torch.where(signs == 0, torch.ones_like(signs), signs)
    explained = s[:k_eff] ** 2 / total
    if k_eff < k:  # fewer patches than components: pad with zeros
        scores = torch.cat([scores, scores.new_zeros(n, k - k_eff)], dim=1)
        explained = torch.cat([explained, explained.new_zeros(k - k_eff)])
    return scores.float(), explained.float()


def to_rgb(scores: torch.Tensor) -> torch.Tensor:
    """Each column scaled to [0, 1] over the rows (a constant column becomes 0.5)."""
    import torch

    lo, hi = scores.min(dim=0).values, scores.max(dim=0).values
    span = hi - lo
    scaled = (scores - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, scaled, torch.full_like(scaled, 0.5))


class _Collector:
    """Per-run state of one ``self_pca`` instance: the open step's summed maps and the finished pictures."""

    def __init__(self) -> None:
        self.result = SelfPca()
        self.sums = StepSums(self._finish)

    def _finish(self, step: tuple[int, float], sums: dict) -> None:
        self.result.steps.append(step)
        for (level, image), (total, count) in sums.items():
            h, w = self.result.grids[level]
            scores, explained = top_components(total / count)
            key = (step[0], level)
            self.result.components.setdefault(key, {})[image] = scores.reshape(h, w, COMPONENTS).cpu().numpy()
            self.result.rgb.setdefault(key, {})[image] = to_rgb(scores).reshape(h, w, COMPONENTS).cpu().numpy()
            self.result.explained.setdefault(key, {})[image] = explained.cpu().numpy()


@dataclass(eq=False)
class SelfMapsOp(ObserveOp):
    """Sums the head-mean self-attention map over the site's own keys, for the conditional rows."""

    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    #: on a joint site: the img>img block of the joint softmax (the image keys' columns)
    joint_sites: ClassVar[bool] = True

    def observe(self, call: AttentionCall, probs: torch.Tensor) -> None:
        picked, images = cond_rows(call)
        if not picked:
            return
        collector = run_collector(call, self.strategy, _Collector)
        note_site(collector.result, call)
        step = step_label(call.state)
        own = probs[..., : call.num_own_keys]
        for row, image in zip(picked, images):
            collector.sums.add(step, (call.site.level, image), own[row].mean(dim=0).detach())


SPEC = StrategySpec(
    name=NAME,
    summary="probe: top-3 PCA components of self-attention maps as RGB per step (materializes HW x HW maps)",
    params=SelfPcaParams,
)


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    """Provide the ``self_pca`` probe."""
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: SelfPcaParams, sites: SiteTable):
    """One observe op per read site, main pass, at the chosen steps."""
    if spec.name != NAME:
        return None
    gate = AtSteps(StepChoice.parse(params.steps))
    return [SelfMapsOp(instance, site=s, gates=(gate,))
            for s in self_attention_sites(params.sites, sites, f"probes.{instance}")]


@attnctl.hookimpl
def attnctl_run_end(state, plan) -> None:
    """Finish the last step and hand the pictures back (``state.results[instance]``)."""
    for instance, collector in finished_collectors(state, plan, NAME):
        collector.sums.flush()
        state.publish(instance, collector.result)
