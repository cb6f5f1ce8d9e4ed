"""Compile a config into a static plan: per-site op lists, latent ops and gates."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from attnctl.errors import ConfigError, did_you_mean
from attnctl.ops import ActiveOps, GateOp, KeyValueOp, LatentOp, ObserveOp, Op, ReweightOp, SiteOp
from attnctl.params import StrategySpec, build_params
from attnctl.plugins import StrategyManager, strategies_config
from attnctl.sites import SiteTable


@dataclass
class Plan:
    """The compiled plan of one attach.

    Attributes:
        sites: the model's sites.
        instances: enabled instance name -> (spec, params).
        site_ops: site name -> ops at that site, in canonical order (stage, instance name).
        latent_ops: latent-guidance ops, sorted by instance name.
        gated_by: instance name -> the gate ops that restrict it (for messages).
    """

    sites: SiteTable
    instances: dict[str, tuple[StrategySpec, Any]] = field(default_factory=dict)
    site_ops: dict[str, tuple[SiteOp, ...]] = field(default_factory=dict)
    latent_ops: tuple[LatentOp, ...] = ()
    gated_by: dict[str, tuple[GateOp, ...]] = field(default_factory=dict)

    @property
    def is_idle(self) -> bool:
        """True when no op was planned: attached processors only pass through."""
        return not self.site_ops and not self.latent_ops

    def active_site_ops(self, state) -> dict[str, ActiveOps]:
        """Ops active in ``state``'s current step and pass, per site (sites without any omitted)."""
        active: dict[str, ActiveOps] = {}
        for name, ops in self.site_ops.items():
            on = [op for op in ops if op.is_active(state)]
            if on:
                active[name] = ActiveOps(
                    key_value=tuple(op for op in on if isinstance(op, KeyValueOp)),
                    reweight=tuple(op for op in on if isinstance(op, ReweightOp)),
                    observe=tuple(op for op in on if isinstance(op, ObserveOp)),
                )
        return active

    def active_latent_ops(self, state) -> tuple[LatentOp, ...]:
        """Latent ops active in ``state``'s current step."""
        return tuple(op for op in self.latent_ops if op.is_active(state))

    def describe(self) -> str:
        """One line per site with ops, for logs and ``attnctl sites --recipe``."""
        lines = [f"{self.sites.by_name(n).key:<10} " + ", ".join(f"{type(o).__name__}({o.strategy})" for o in ops)
                 for n, ops in self.site_ops.items()]
        lines += [f"latent     {type(o).__name__}({o.strategy})" for o in self.latent_ops]
        return "\n".join(lines) or "(idle: no strategy active)"


def _sort_key(op: Op) -> tuple:
    return (type(op).stage, op.strategy)


def compile_plan(config: Any, sites: SiteTable, manager: StrategyManager) -> Plan:
    """Validate ``config`` and ask every plugin to plan its enabled instances.

    ``config['strategies']`` maps instance name -> settings; ``strategy`` (default: the
    instance name) picks the strategy type, ``enabled`` (default true) switches it.
    The result does not depend on the order plugins were registered in.
    """
    instances: dict[str, tuple[StrategySpec, Any]] = {}
    for instance, settings in strategies_config(config).items():
        settings = dict(settings or {})
        where = f"strategies.{instance}"
        enabled = settings.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}.enabled: expected true or false, got {enabled!r}")
        spec = manager.spec(str(settings.get("strategy", instance)), where)
        params = build_params(spec, settings, where)
        if enabled:
            instances[instance] = (spec, params)
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
