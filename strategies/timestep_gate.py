"""Timestep-range gating: switch other strategy instances on only in a window of t / T_train.

A rule ``instance: {min: a, max: b}`` keeps that instance's ops active on the steps with

    a <= t / T_train < b          (a missing bound is unbounded)

where t is the timestep *value* of the step (not its index), so a rule means the same
for any scheduler and step count. HarmonPaint's efficient division (eta = 0.6):
``{sams: {min: 0.6}, steer: {min: 0.6}, makvs: {max: 0.6}}``; with DDIM 50 steps
(t = 981, 961, ..., 1) that is 20 structure steps, then 30 style steps.

For flow-matching schedulers (SD3, FLUX) t / T_train is the noise level sigma. With
``on: step`` the rules read the share of steps still to come, 1 - k / N (k the step's
index, N the run's step count: 1 at the first step, falling like t / T_train), so
``{min: 0.5}`` keeps the steps with at least half of the run to come, whatever the
schedule's shift.

This is an ordinary strategy: it plans one ``GateOp`` per rule, and the core ANDs each
gate into the target instance's ops. Rules naming a disabled instance are ignored;
rules naming an instance that is not in the config are an error (raised by the core).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import attnctl
from attnctl.errors import ConfigError
from attnctl.ops import GateOp
from attnctl.params import StrategySpec
from attnctl.sites import SiteTable

if TYPE_CHECKING:
    from attnctl.interfaces import RunView

NAME = "timestep_gate"
_BOUNDS = ("min", "max")


def _bound(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: expected a number (t / T_train, e.g. 0.6) or null, got {value!r}")
    return float(value)


def _parse_rule(target: str, rule: Any) -> dict[str, float | None]:
    where = f"rules.{target}"
    if not isinstance(rule, Mapping):
        raise ConfigError(f"{where}: expected a mapping like {{min: 0.6}} or {{max: 0.6}}, got {rule!r}")
    unknown = sorted(set(rule) - set(_BOUNDS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; a rule takes only 'min' and 'max'")
    lo, hi = (_bound(rule.get(k), f"{where}.{k}") for k in _BOUNDS)
    if lo is not None and hi is not None and not lo < hi:
        raise ConfigError(f"{where}: min ({lo}) must be smaller than max ({hi}), else the instance never runs")
    return {"min": lo, "max": hi}


@dataclass
class TimestepGateParams:
    """Parameters of ``timestep_gate``."""

    rules: dict = field(
        default_factory=dict,
        metadata={"help": "instance name -> {min, max} on t/T_train; active when min <= t/T_train < max"},
    )

    on: str = field(default="t", metadata={
        "help": "what min and max bound: 't' (t/T_train; sigma for flow matching) or 'step' (1 - k/N: the share "
                "of steps still to come, 1 at the first step)"})

    def __post_init__(self) -> None:
        self.rules = {str(target): _parse_rule(str(target), rule) for target, rule in self.rules.items()}
        if self.on not in VARIABLES:
            raise ConfigError(f"on: unknown '{self.on}'; choose one of {', '.join(VARIABLES)}")


@dataclass(frozen=True)
class TimeWindow:
    """Gate predicate ``min <= v < max`` on the run state's current step, v = t / T_train or the step fraction."""

    min: float | None = None
    max: float | None = None
    on: str = "t"

    def __call__(self, state: RunView) -> bool:
        t = state.t_norm if self.on == "t" else _steps_to_come(state)
        if t is None:  # no step entered yet
            return False
        return (self.min is None or t >= self.min) and (self.max is None or t < self.max)

    def __str__(self) -> str:
        lo = "" if self.min is None else f"{self.min:g} <= "
        hi = "" if self.max is None else f" < {self.max:g}"
        name = VARIABLES[self.on]
        return f"{lo}{name}{hi}" if lo or hi else "always"


#: what a rule can bound, and how messages name it
VARIABLES = {"t": "t/T", "step": "1-k/N"}


def _steps_to_come(state: RunView) -> float | None:
    """1 - k / N: the share of the run's steps still to come, this one included (1 at the first), or None."""
    n, k = state.num_inference_steps, state.step_index
    return None if n is None or k is None else 1.0 - k / n


SPEC = StrategySpec(
    name=NAME,
    summary="Activate other strategy instances only for min <= t/T_train (or 1-k/N) < max (e.g. HarmonPaint's phases)",
    params=TimestepGateParams,
)


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    """Provide ``timestep_gate``."""
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: TimestepGateParams, sites: SiteTable) -> list[GateOp] | None:
    """One ``GateOp`` per rule, targeting the rule's instance."""
    if spec.name != NAME:
        return None
    if instance in params.rules:
        raise ConfigError(f"strategies.{instance}.rules.{instance}: a timestep gate cannot gate itself")
    return [
        GateOp(instance, targets=(target,), gate=TimeWindow(rule["min"], rule["max"], params.on))
        for target, rule in sorted(params.rules.items())
    ]
