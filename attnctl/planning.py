"""Compile a config into a plan: validate it, ask every plugin to plan its enabled instances.

A config has two sections of instances, ``strategies`` and ``probes``, written the same
way (instance name -> ``{strategy: type, enabled: bool, ...params}``) and sharing one
namespace of instance names. They differ in two rules: a probe is off unless
``enabled: true``, and a probe may only read the run (``ObserveOp``, ``MeasureOp``), so it
never changes what the pipeline makes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Mapping

from attnctl.errors import ConfigError, did_you_mean
from attnctl.ops import GateOp, LatentOp, MeasureOp, ObserveOp, Op, SiteOp
from attnctl.params import StrategySpec, build_params
from attnctl.plan import Plan
from attnctl.plugins import StrategyManager, strategies_config
from attnctl.feature_ops import FeatureOp
from attnctl.rows import RowOp, check_roles
from attnctl.sites import SiteTable
from attnctl.step_ops import STEP_OP_TYPES, PredictionOp


def _sort_key(op: Op) -> tuple:
    return (type(op).stage, op.strategy)


#: config sections of instances, and whether an instance there is on without ``enabled``
SECTIONS = {"strategies": True, "probes": False}


@dataclass(frozen=True)
class Instance:
    """One configured strategy instance, validated against its plugin's parameter dataclass."""

    name: str
    spec: StrategySpec
    params: Any
    enabled: bool
    section: str = "strategies"


def resolve_instances(config: Any, manager: StrategyManager, section: str = "strategies") -> list[Instance]:
    """Validate every instance of ``config[section]`` (enabled or not), in config order.

    Each maps instance name -> settings; ``strategy`` (default: the instance name) picks the
    strategy type, ``enabled`` switches it (default: true under ``strategies``, false under
    ``probes``), the rest are its parameters.

    Raises:
        ConfigError: settings that are not a mapping, a non-boolean ``enabled``, an unknown
            strategy, or a parameter its dataclass refuses (each naming the key).
    """
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section '{section}'; use one of {', '.join(SECTIONS)}")
    instances = []
    for name, settings in strategies_config(config, section).items():
        where = f"{section}.{name}"
        if settings is None:
            settings = {}
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'strategy' and its parameters, got {settings!r}")
        enabled = settings.get("enabled", SECTIONS[section])
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}.enabled: expected true or false, got {enabled!r}")
        spec = manager.spec(str(settings.get("strategy", name)), where)
        instances.append(Instance(name, spec, build_params(spec, settings, where), enabled, section))
    return instances


def resolve_all(config: Any, manager: StrategyManager) -> list[Instance]:
    """``resolve_instances`` of every section; an instance name used in two sections is refused."""
    found: list[Instance] = []
    seen: dict[str, str] = {}
    for section in SECTIONS:
        for instance in resolve_instances(config, manager, section):
            if instance.name in seen:
                raise ConfigError(
                    f"{section}.{instance.name}: the name '{instance.name}' is also an instance under "
                    f"{seen[instance.name]}; instance names are shared by strategies and probes, rename one"
                )
            seen[instance.name] = section
            found.append(instance)
    return found


def _check_probe_ops(name: str, spec: StrategySpec, ops: list[Op]) -> None:
    """A probe only reads the run: anything but observe/measure ops would change the image."""
    for op in ops:
        if not isinstance(op, (ObserveOp, MeasureOp)):
            raise ConfigError(
                f"probes.{name}: strategy '{spec.name}' plans a {type(op).__name__}, which changes the run; "
                "a probe may only observe or measure (ObserveOp, MeasureOp): put it under strategies instead"
            )


def compile_plan(config: Any, sites: SiteTable, manager: StrategyManager) -> Plan:
    """Validate ``config`` and ask every plugin to plan its enabled instances (strategies and probes).

    The result does not depend on the order plugins were registered in.
    """
    resolved = [i for i in resolve_all(config, manager) if i.enabled]
    instances = {i.name: (i.spec, i.params) for i in resolved}
    probes = frozenset(i.name for i in resolved if i.section == "probes")
    manager.hook.attnctl_validate(instances=instances, sites=sites)

    planned: list[Op] = []
    for instance, (spec, params) in sorted(instances.items()):
        answers = [a for a in manager.hook.attnctl_plan(instance=instance, spec=spec, params=params, sites=sites)
                   if a is not None]
        if len(answers) != 1:
            raise ConfigError(
                f"strategy '{spec.name}' (strategies.{instance}) was planned by {len(answers)} plugins; "
                "exactly one plugin must answer attnctl_plan for it"
            )
        if instance in probes:
            _check_probe_ops(instance, spec, list(answers[0]))
        for op in answers[0]:
            if op.strategy != instance:
                op = replace(op, strategy=instance)
            planned.append(op)

    gates: dict[str, list] = defaultdict(list)
    gated_by: dict[str, list[GateOp]] = defaultdict(list)
    for op in planned:
        if isinstance(op, GateOp):
            for target in op.targets:
                if target not in instances:
                    if target in strategies_config(config):
                        continue  # gating a disabled instance: nothing to gate
                    raise ConfigError(
                        f"strategies.{op.strategy} gates unknown strategy instance '{target}'"
                        f"{did_you_mean(target, instances)}; instances: {', '.join(instances) or '(none)'}"
                    )
                gates[target].append(op.gate)
                gated_by[target].append(op)

    plan = Plan(sites=sites, instances=instances, gated_by={k: tuple(v) for k, v in gated_by.items()}, probes=probes)
    per_site: dict[str, list[SiteOp]] = defaultdict(list)
    latent: list[LatentOp] = []
    rows, step, features = [], [], []
    for op in planned:
        if isinstance(op, GateOp):
            continue
        if isinstance(op, RowOp):  # rows exist for the whole run; gates do not apply to them
            rows.append((op.strategy, op.row))
            continue
        if gates.get(op.strategy):
            op = replace(op, gates=op.gates + tuple(gates[op.strategy]))
        if isinstance(op, SiteOp):
            if op.site.is_joint and not op.joint_sites:
                raise ConfigError(
                    f"strategies.{op.strategy} plans {type(op).__name__} at {op.site.key} ({op.site.name}), a joint "
                    "site (text and image tokens in one attention), and that op was not written for joint sites; "
                    "select other sites for it, or leave it out for this model (docs/architecture.md, joint sites)"
                )
            per_site[op.site.name].append(op)
        elif isinstance(op, LatentOp):
            latent.append(op)
        elif isinstance(op, STEP_OP_TYPES):
            step.append(op)
        elif isinstance(op, FeatureOp):
            features.append(op)
        else:
            raise ConfigError(f"strategies.{op.strategy} planned an op of unknown type {type(op).__name__}")
    # canonical order: sites in table order, ops by (stage, instance name)
    plan.site_ops = {s.name: tuple(sorted(per_site[s.name], key=_sort_key)) for s in sites if s.name in per_site}
    plan.latent_ops = tuple(sorted(latent, key=_sort_key))
    check_roles(rows)
    plan.rows = tuple(sorted(rows, key=lambda pair: pair[1].role))
    predictions = sorted({op.strategy for op in step if isinstance(op, PredictionOp)})
    if len(predictions) > 1:
        raise ConfigError(
            f"{' and '.join(f'strategies.{name}' for name in predictions)} each combine the noise predictions "
            "(a PredictionOp); only one combination can make a step's prediction: enable one of them, or gate "
            "them to different steps in one strategy"
        )
    plan.step_ops = tuple(sorted(step, key=lambda op: op.strategy))
    plan.feature_ops = tuple(sorted(features, key=lambda op: op.strategy))
    return plan
