"""Compile a config into a plan: validate it, ask every plugin to plan its enabled instances."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Mapping

from attnctl.errors import ConfigError, did_you_mean
from attnctl.ops import GateOp, LatentOp, Op, SiteOp
from attnctl.params import StrategySpec, build_params
from attnctl.plan import Plan
from attnctl.plugins import StrategyManager, strategies_config
from attnctl.sites import SiteTable


def _sort_key(op: Op) -> tuple:
    return (type(op).stage, op.strategy)


@dataclass(frozen=True)
class Instance:
    """One configured strategy instance, validated against its plugin's parameter dataclass."""

    name: str
    spec: StrategySpec
    params: Any
    enabled: bool


def resolve_instances(config: Any, manager: StrategyManager) -> list[Instance]:
    """Validate every instance of ``config['strategies']`` (enabled or not), in config order.

    Each maps instance name -> settings; ``strategy`` (default: the instance name) picks the
    strategy type, ``enabled`` (default true) switches it, the rest are its parameters.

    Raises:
        ConfigError: settings that are not a mapping, a non-boolean ``enabled``, an unknown
            strategy, or a parameter its dataclass refuses (each naming the key).
    """
    instances = []
    for name, settings in strategies_config(config).items():
        where = f"strategies.{name}"
        if settings is None:
            settings = {}
        if not isinstance(settings, Mapping):
            raise ConfigError(f"{where}: expected a mapping with 'strategy' and its parameters, got {settings!r}")
        enabled = settings.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}.enabled: expected true or false, got {enabled!r}")
        spec = manager.spec(str(settings.get("strategy", name)), where)
        instances.append(Instance(name, spec, build_params(spec, settings, where), enabled))
    return instances


def compile_plan(config: Any, sites: SiteTable, manager: StrategyManager) -> Plan:
    """Validate ``config`` and ask every plugin to plan its enabled instances.

    The result does not depend on the order plugins were registered in.
    """
    instances = {i.name: (i.spec, i.params) for i in resolve_instances(config, manager) if i.enabled}
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

    plan = Plan(sites=sites, instances=instances, gated_by={k: tuple(v) for k, v in gated_by.items()})
    per_site: dict[str, list[SiteOp]] = defaultdict(list)
    latent: list[LatentOp] = []
    for op in planned:
        if isinstance(op, GateOp):
            continue
        if gates.get(op.strategy):
            op = replace(op, gates=op.gates + tuple(gates[op.strategy]))
        if isinstance(op, SiteOp):
            per_site[op.site.name].append(op)
        elif isinstance(op, LatentOp):
            latent.append(op)
        else:
            raise ConfigError(f"strategies.{op.strategy} planned an op of unknown type {type(op).__name__}")
    # canonical order: sites in table order, ops by (stage, instance name)
    plan.site_ops = {s.name: tuple(sorted(per_site[s.name], key=_sort_key)) for s in sites if s.name in per_site}
    plan.latent_ops = tuple(sorted(latent, key=_sort_key))
    return plan
