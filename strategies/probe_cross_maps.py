"""``cross_maps`` probe: the cross-attention map of each prompt token, per step and token grid.

At every read site (default ``cross/4,cross/2``: the grids HarmonPaint's steer loss reads,
16x16 and 32x32 for a 512x512 image) and chosen step, a ``MeasureOp`` multiplies the
effective cross-attention weights by one indicator column per chosen token::

    map_i(q) = sum_j A(q, j) [j = position of token i]  =  A(q, position_i)

inside the site's fused attention call (the columns ride along as value channels), so no
map over all 77 text positions is formed either. Maps are averaged over heads and over
the read sites of one grid, for the conditional rows of the main pass; a step's sums are
turned into its maps when the next step begins, so memory holds one step's sums plus the
maps of the chosen steps, whatever the number of steps.

Result (``state.results[instance]`` after the run): ``CrossMaps``; ``attnctl probe``
upsamples each map to the image and draws grids (rows = steps, columns = tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import attnctl
from attnctl.errors import ConfigError
from attnctl.ops import MeasureOp
from attnctl.params import StrategySpec
from attnctl.selectors import select_sites
from attnctl.sites import SiteTable
from strategies._probe_common import (
    STEPS_HELP,
    TOKENS_HELP,
    AtSteps,
    StepChoice,
    StepSums,
    check_tokens,
    cond_rows,
    finished_collectors,
    note_site,
    run_collector,
    step_label,
    token_positions,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from attnctl.call import AttentionCall

NAME = "cross_maps"


@dataclass
class CrossMapsParams:
    """Parameters of the ``cross_maps`` probe."""

    sites: str = field(default="cross/4,cross/2", metadata={"help": "cross-attention sites to read (selector)"})
    steps: str | tuple[int, ...] = field(default="spread:5", metadata={"help": STEPS_HELP})
    tokens: str | tuple[int, ...] = field(default="prompt", metadata={"help": TOKENS_HELP})

    def __post_init__(self) -> None:
        StepChoice.parse(self.steps, "steps")
        check_tokens(self.tokens)


@dataclass
class CrossMaps:
    """What the ``cross_maps`` probe measured in one run.

    Attributes:
        steps: (step index, timestep) of each recorded step, in run order.
        grids: level -> token grid (H, W); level = number of stride-2 downsamplings.
        sites: level -> the site keys averaged at that grid.
        tokens: image -> the text positions mapped (column ``i`` of its maps is ``tokens[image][i]``).
        maps: (step index, level) -> image -> ``[len(tokens[image]), H, W]`` float32: the mean
            over heads and sites of the attention each query patch gives the token.
    """

    steps: list[tuple[int, float]] = field(default_factory=list)
    grids: dict[int, tuple[int, int]] = field(default_factory=dict)
    sites: dict[int, list[str]] = field(default_factory=dict)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    maps: dict[tuple[int, int], dict[int, np.ndarray]] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """Every number as JSON-ready lists."""
        return {
            "kind": NAME,
            "steps": [{"step": s, "timestep": t} for s, t in self.steps],
            "grids": {str(level): list(grid) for level, grid in sorted(self.grids.items())},
            "sites": {str(level): keys for level, keys in sorted(self.sites.items())},
            "tokens": {str(image): positions for image, positions in sorted(self.tokens.items())},
            "maps": [
                {"step": step, "level": level, "image": image, "map": array.astype("float64").round(7).tolist()}
                for (step, level), by_image in sorted(self.maps.items())
                for image, array in sorted(by_image.items())
            ],
        }


class _Collector:
    """Per-run state of one ``cross_maps`` instance: the open step's sums and the finished maps."""

    def __init__(self) -> None:
        self.result = CrossMaps()
        self.sums = StepSums(self._finish)

    def _finish(self, step: tuple[int, float], sums: dict) -> None:
        self.result.steps.append(step)
        for (level, image), (total, count) in sums.items():
            h, w = self.result.grids[level]
            mean = (total / count).transpose(0, 1).reshape(-1, h, w)  # [T, H, W]
            self.result.maps.setdefault((step[0], level), {})[image] = mean.detach().cpu().numpy()


@dataclass(eq=False)
class CrossMapsOp(MeasureOp):
    """One indicator column per chosen token; records the head-mean maps of the conditional rows."""

    tokens: str | tuple[int, ...] = field(default="prompt", kw_only=True)

    #: on a joint site: the img>txt block, renormalized over the text with one more column (all text keys)
    joint_sites: ClassVar[bool] = True

    def columns(self, call: AttentionCall) -> torch.Tensor:
        n_keys = call.key.shape[-2]
        return call.memo((NAME, self.strategy, n_keys), lambda: self._columns(call, n_keys))

    def _columns(self, call: AttentionCall, n_keys: int) -> torch.Tensor:
        import torch

        layout = call.layout
        positions = [token_positions(call.state, self.tokens, p, call.text_length, self.strategy)
                     for p in layout.prompts]
        width = max(len(p) for p in positions)
        joint = bool(call.context_keys)
        columns = torch.zeros(len(positions), 1, n_keys, width + joint, device=call.query.device)
        for row, pos in enumerate(positions):
            columns[row, 0, [call.text_key(p) for p in pos], list(range(len(pos)))] = 1.0
        if joint:  # the text's share of each row, to renormalize by (the softmax also spends mass on image keys)
            columns[:, 0, call.key_span("txt"), width] = 1.0
        return columns

    def measure(self, call: AttentionCall, sums: torch.Tensor, output: torch.Tensor) -> None:
        picked, images = cond_rows(call)
        if not picked:
            return
        collector = run_collector(call, self.strategy, _Collector)
        note_site(collector.result, call)
        step = step_label(call.state)
        layout = call.layout
        if call.context_keys:
            sums = sums[..., :-1] / sums[..., -1:]
        for row, image in zip(picked, images):
            positions = token_positions(call.state, self.tokens, layout.prompts[row], call.text_length, self.strategy)
            collector.result.tokens[image] = positions
            head_mean = sums[row, :, :, : len(positions)].mean(dim=0)  # [HW, T]
            collector.sums.add(step, (call.site.level, image), head_mean.detach())


SPEC = StrategySpec(
    name=NAME,
    summary="probe: cross-attention map of each prompt token per step and grid (fused, no extra map)",
    params=CrossMapsParams,
)


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    """Provide the ``cross_maps`` probe."""
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: CrossMapsParams, sites: SiteTable):
    """One measure op per read site, main pass, at the chosen steps."""
    if spec.name != NAME:
        return None
    picked = select_sites(params.sites, sites)
    not_cross = [s.key for s in picked if "img>txt" not in s.blocks]
    if not_cross:
        raise ConfigError(f"probes.{instance}.sites: {', '.join(not_cross)} are self-attention sites; "
                          "token maps come from cross-attention sites (e.g. 'cross/4,cross/2')")
    gate = AtSteps(StepChoice.parse(params.steps))
    return [CrossMapsOp(instance, site=s, tokens=params.tokens, gates=(gate,)) for s in picked]


@attnctl.hookimpl
def attnctl_run_end(state, plan) -> None:
    """Finish the last step and hand the maps back (``state.results[instance]``)."""
    for instance, collector in finished_collectors(state, plan, NAME):
        collector.sums.flush()
        state.publish(instance, collector.result)
