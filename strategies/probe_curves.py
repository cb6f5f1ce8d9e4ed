"""``curves`` probe: per-step scalar curves of what HarmonPaint's mechanisms change.

Every quantity is measured for the *masked* query patches (the region being inpainted) of
the conditional rows of the main pass, averaged over heads and those patches, per site
and step. All come out of ``MeasureOp`` columns that ride along in the sites' fused
attention calls (no map is formed), ``W`` being the effective weights the output is made
of (after every reweighting) and ``S(q) = sum_j W(q, j)`` a row's total:

self-attention sites (``self_sites``):

- ``background_share``: ``sum_{own j, M(j)=0} W(q, j) / S(q)``, the share of attention on
  the unmasked patches, which SAMS (``region_mask``) scales down by its soft mask (Eq. 4-7);
- ``bank_share``: ``sum_{appended j} W(q, j) / S(q)``, the share on keys appended by
  key/value ops, which MAKVS (``kv_bank``) adds (Eq. 10-12);
- ``row_mass``: ``S(q)``, 1 unless a reweighting without renormalization removed mass;
- ``mean_gap`` / ``std_gap``: how far the masked patches' features are from the unmasked
  ones', as the RMS over channels of the difference of the per-channel means (stds) of the
  site's attention output (heads merged) over each region (what MAKVS moves).

cross-attention sites (``cross_sites``):

- ``object_mass``: ``sum_{object tokens i} W(q, i)``, the attention the chosen tokens
  (default: the prompt's own) get inside the mask, which the steer loss raises (Eq. 8-9);
- ``object_share``: the same divided by the attention on all text positions but the start
  token (the steer loss renormalizes over those).

And from every ``latent_guidance`` instance of the run, its per-step log: the loss before
each gradient update and the step size ``alpha``.

Result (``state.results[instance]``): ``Curves``; ``attnctl probe`` plots it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import attnctl
from attnctl.errors import ConfigError
from attnctl.ops import KeyValueOp, MeasureOp, ReweightOp
from attnctl.params import StrategySpec
from attnctl.selectors import select_sites
from attnctl.sites import SiteTable
from strategies._attention_sites import grid_tokens
from strategies._probe_common import (
    STEPS_HELP,
    TOKENS_HELP,
    AtSteps,
    StepChoice,
    check_tokens,
    cond_rows,
    finished_collectors,
    run_collector,
    step_label,
    token_positions,
)
from strategies.latent_guidance import NAME as LATENT_GUIDANCE

if TYPE_CHECKING:
    import numpy as np
    import torch

    from attnctl.call import AttentionCall

NAME = "curves"
SELF_QUANTITIES = ("background_share", "bank_share", "row_mass", "mean_gap", "std_gap")
CROSS_QUANTITIES = ("object_mass", "object_share")


@dataclass
class CurvesParams:
    """Parameters of the ``curves`` probe."""

    self_sites: str = field(default="self", metadata={"help": "self-attention sites to measure (selector)"})
    cross_sites: str = field(default="cross/4,cross/2", metadata={"help": "cross-attention sites to measure (selector)"})
    tokens: str | tuple[int, ...] = field(default="prompt", metadata={"help": "object tokens: " + TOKENS_HELP})
    steps: str | tuple[int, ...] = field(default="all", metadata={"help": STEPS_HELP})

    def __post_init__(self) -> None:
        StepChoice.parse(self.steps, "steps")
        check_tokens(self.tokens)


@dataclass
class Curves:
    """What the ``curves`` probe measured in one run.

    Attributes:
        steps: (step index, timestep) of each measured step, in run order.
        sites: site key -> ``{"kind", "level", "grid"}`` of each measured site.
        series: quantity -> site key -> image -> one value per entry of ``steps`` (NaN where
            not measured, e.g. no masked patch at that grid).
        groups: ``"reweighted"`` / ``"extended"`` -> the measured self sites where another
            instance of the run plans reweight ops (e.g. SAMS) / key/value ops (e.g. MAKVS).
        guidance: latent_guidance instance -> its log, one entry per gradient update:
            ``{"step", "iteration", "alpha", "loss"}``.
    """

    steps: list[tuple[int, float]] = field(default_factory=list)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    series: dict[str, dict[str, dict[int, list[float]]]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    guidance: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def curve(self, quantity: str, sites: list[str] | None = None, image: int = 0) -> np.ndarray:
        """Per step, the mean of ``quantity`` over ``sites`` (default: every site that has it), NaNs ignored."""
        import numpy as np

        by_site = self.series.get(quantity, {})
        chosen = [s for s in (sites if sites is not None else by_site) if image in by_site.get(s, {})]
        if not chosen:
            return np.full(len(self.steps), np.nan)
        rows = np.array([by_site[s][image] for s in chosen], dtype=float)
        with np.errstate(invalid="ignore"):
            counts = (~np.isnan(rows)).sum(axis=0)
            return np.where(counts > 0, np.nansum(rows, axis=0) / np.maximum(counts, 1), np.nan)

    def to_record(self) -> dict[str, Any]:
        """Every number as JSON-ready lists (NaN written as null)."""
        def clean(values: list[float]) -> list[float | None]:
            return [None if math.isnan(v) else round(v, 9) for v in values]

        return {
            "kind": NAME,
            "steps": [{"step": s, "timestep": t} for s, t in self.steps],
            "sites": self.sites,
            "groups": self.groups,
            "series": {q: {site: {str(img): clean(v) for img, v in sorted(by_img.items())}
                           for site, by_img in by_site.items()} for q, by_site in self.series.items()},
            "guidance": self.guidance,
        }


class _Collector:
    """Per-run measurements of one ``curves`` instance, kept as small tensors until the run ends."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float]] = []
        self.sites: dict[str, dict[str, Any]] = {}
        self.values: list[tuple[int, str, str, int, torch.Tensor]] = []  # (step slot, quantity, site, image, value)

    def slot(self, call: AttentionCall) -> int:
        step = step_label(call.state)
        if not self.steps or self.steps[-1] != step:
            self.steps.append(step)
        site = call.site
        self.sites.setdefault(site.key, {"kind": site.kind, "level": site.level, "grid": list(call.grid)})
        return len(self.steps) - 1

    def add(self, slot: int, quantity: str, site: str, image: int, value: torch.Tensor) -> None:
        self.values.append((slot, quantity, site, image, value.detach().float().reshape(())))

    def result(self, groups: dict[str, list[str]], guidance: dict[str, list[dict[str, Any]]]) -> Curves:
        import torch

        numbers = torch.stack([v for *_, v in self.values]).cpu().tolist() if self.values else []
        series: dict[str, dict[str, dict[int, list[float]]]] = {}
        for (slot, quantity, site, image, _), number in zip(self.values, numbers):
            row = series.setdefault(quantity, {}).setdefault(site, {}).setdefault(image, [math.nan] * len(self.steps))
            row[slot] = float(number)
        measured = set(self.sites)
        return Curves(list(self.steps), dict(self.sites), series,
                      {name: [s for s in keys if s in measured] for name, keys in groups.items()}, guidance)


def _collector(call: AttentionCall, instance: str) -> _Collector:
    return run_collector(call, instance, _Collector)


def _masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [h, HW] over heads and the patches where ``weights`` [HW] is 1 (NaN if none).

    Written without boolean indexing, so no value is read back to the host during the run.
    """
    return (values * weights).sum() / (weights.sum() * values.shape[0])


def _region_stats(features: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std of ``features`` [HW, C] over the patches where ``weights`` is 1."""
    count = weights.sum()
    mean = (weights @ features) / count
    var = (weights @ features.pow(2)) / count - mean.pow(2)
    return mean, var.clamp_min(0.0).sqrt()


@dataclass(eq=False)
class SelfCurvesOp(MeasureOp):
    """Columns: unmasked own keys, appended keys, all keys. Records background/bank shares and feature gaps."""

    #: on a joint site: own keys are the image keys; the text keys count in the total only
    joint_sites: ClassVar[bool] = True

    def columns(self, call: AttentionCall) -> torch.Tensor:
        n_keys = call.key.shape[-2]
        return call.memo((NAME, "self", n_keys), lambda: self._columns(call, n_keys))

    @staticmethod
    def _columns(call: AttentionCall, n_keys: int) -> torch.Tensor:
        import torch

        hw = grid_tokens(call)
        mask = call.mask()
        columns = torch.zeros(mask.shape[0], 1, n_keys, 3, device=mask.device)
        columns[:, 0, :hw, 0] = 1.0 - mask
        columns[:, 0, hw + call.context_keys :, 1] = 1.0  # keys appended by key/value ops
        columns[..., 2] = 1.0
        return columns

    def measure(self, call: AttentionCall, sums: torch.Tensor, output: torch.Tensor) -> None:
        total = sums[..., 2]
        for collector, slot, key, row, image, inside in _recorded_rows(call, self.strategy):
            collector.add(slot, "background_share", key, image, _masked_mean(sums[row, ..., 0] / total[row], inside))
            collector.add(slot, "bank_share", key, image, _masked_mean(sums[row, ..., 1] / total[row], inside))
            collector.add(slot, "row_mass", key, image, _masked_mean(total[row], inside))
            features = output[row].float().transpose(0, 1).reshape(inside.shape[0], -1)  # [HW, heads * d]
            mean_in, std_in = _region_stats(features, inside)
            mean_out, std_out = _region_stats(features, 1.0 - inside)
            collector.add(slot, "mean_gap", key, image, (mean_in - mean_out).pow(2).mean().sqrt())
            collector.add(slot, "std_gap", key, image, (std_in - std_out).pow(2).mean().sqrt())


def _recorded_rows(call: AttentionCall, strategy: str):
    """For each conditional row of ``call``: the run's collector, this call's slot, the site key,
    the row, its image index and the row's flattened mask (1 = masked query)."""
    picked, images = cond_rows(call)
    if not picked:
        return
    collector = _collector(call, strategy)
    slot = collector.slot(call)
    mask = call.mask()
    for row, image in zip(picked, images):
        yield collector, slot, call.site.key, row, image, mask[row]


@dataclass(eq=False)
class CrossCurvesOp(MeasureOp):
    """Columns: the object tokens, every text position but the start token. Records their in-mask mass."""

    tokens: str | tuple[int, ...] = field(default="prompt", kw_only=True)

    #: on a joint site: the img>txt block (masses are shares of the whole joint softmax)
    joint_sites: ClassVar[bool] = True

    def columns(self, call: AttentionCall) -> torch.Tensor:
        n_keys = call.key.shape[-2]
        return call.memo((NAME, "cross", self.strategy, n_keys), lambda: self._columns(call, n_keys))

    def _columns(self, call: AttentionCall, n_keys: int) -> torch.Tensor:
        import torch

        prompts = call.layout.prompts
        columns = torch.zeros(len(prompts), 1, n_keys, 2, device=call.query.device)
        for row, prompt in enumerate(prompts):
            positions = token_positions(call.state, self.tokens, prompt, call.text_length, self.strategy)
            columns[row, 0, [call.text_key(p) for p in positions], 0] = 1.0
        text = call.key_span("txt")
        columns[:, 0, text.start + int(call.state.text_start_token) : text.stop, 1] = 1.0  # the start token left out
        return columns

    def measure(self, call: AttentionCall, sums: torch.Tensor, output: torch.Tensor) -> None:
        for collector, slot, key, row, image, inside in _recorded_rows(call, self.strategy):
            collector.add(slot, "object_mass", key, image, _masked_mean(sums[row, ..., 0], inside))
            collector.add(slot, "object_share", key, image, _masked_mean(sums[row, ..., 0] / sums[row, ..., 1], inside))


SPEC = StrategySpec(
    name=NAME,
    summary="probe: per-step curves (background share, bank share, feature gaps, object-token mass, steer loss)",
    params=CurvesParams,
)


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    """Provide the ``curves`` probe."""
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: CurvesParams, sites: SiteTable):
    """A measure op at every chosen self and cross site, main pass, at the chosen steps."""
    if spec.name != NAME:
        return None
    gate = AtSteps(StepChoice.parse(params.steps))
    self_sites = select_sites(params.self_sites, sites)
    cross_sites = select_sites(params.cross_sites, sites)
    wrong = ([s.key for s in self_sites if "img>img" not in s.blocks]
             + [s.key for s in cross_sites if "img>txt" not in s.blocks])
    if wrong:
        raise ConfigError(f"probes.{instance}: {', '.join(wrong)} are in the wrong selector; self_sites takes "
                          "self-attention sites (e.g. 'self'), cross_sites cross-attention sites (e.g. 'cross/4,cross/2')")
    return ([SelfCurvesOp(instance, site=s, gates=(gate,)) for s in self_sites]
            + [CrossCurvesOp(instance, site=s, tokens=params.tokens, gates=(gate,)) for s in cross_sites])


def _groups(plan) -> dict[str, list[str]]:
    """Self sites where instances other than probes reweight / append keys."""
    groups: dict[str, list[str]] = {"reweighted": [], "extended": []}
    for name, ops in plan.site_ops.items():
        key = plan.sites.by_name(name).key
        if any(isinstance(op, ReweightOp) for op in ops):
            groups["reweighted"].append(key)
        if any(isinstance(op, KeyValueOp) for op in ops):
            groups["extended"].append(key)
    return groups


@attnctl.hookimpl
def attnctl_run_end(state, plan) -> None:
    """Hand the curves back (``state.results[instance]``), with every latent_guidance log of the run."""
    guidance = {name: [dict(entry) for entry in state.scratch.get(name, {}).get("history", [])]
                for name, (spec, _) in plan.instances.items() if spec.name == LATENT_GUIDANCE}
    for instance, collector in finished_collectors(state, plan, NAME):
        state.publish(instance, collector.result(_groups(plan), guidance))
