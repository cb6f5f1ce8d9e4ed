"""The compiled plan of one attach: static per-site op lists, latent ops and the gates on them.

``attnctl.planning.compile_plan`` builds it from a config by asking the strategy plugins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnctl.feature_ops import FeatureOp
from attnctl.ops import ActiveOps, GateOp, LatentOp, Op, SiteOp
from attnctl.params import StrategySpec
from attnctl.rows import RowSpec
from attnctl.sites import SiteTable

if TYPE_CHECKING:
    from attnctl.interfaces import RunView


@dataclass
class Plan:
    """The compiled plan of one attach.

    Attributes:
        sites: the model's sites.
        instances: enabled instance name -> (spec, params).
        site_ops: site name -> ops at that site, in canonical order (stage, instance name).
        latent_ops: latent-guidance ops, sorted by instance name.
        gated_by: instance name -> the gate ops that restrict it (for messages).
        rows: (instance, RowSpec) of every role strategies add to the batch, by role.
        step_ops: prediction, post-step and noise ops (``attnctl.step_ops``), by instance name.
        feature_ops: ops on non-attention modules (``attnctl.feature_ops``), by instance name.
        probes: the enabled instances of the ``probes`` section (they only observe or
            measure; their results are in ``RunState.results`` after a run).
    """

    sites: SiteTable
    instances: dict[str, tuple[StrategySpec, Any]] = field(default_factory=dict)
    site_ops: dict[str, tuple[SiteOp, ...]] = field(default_factory=dict)
    latent_ops: tuple[LatentOp, ...] = ()
    gated_by: dict[str, tuple[GateOp, ...]] = field(default_factory=dict)
    probes: frozenset[str] = frozenset()
    rows: tuple[tuple[str, RowSpec], ...] = ()
    step_ops: tuple[Op, ...] = ()
    feature_ops: tuple[FeatureOp, ...] = ()

    @property
    def preparing(self) -> tuple[Op, ...]:
        """One op per (instance, op class) that overrides ``Op.prepare``, in instance-name order."""
        found: dict[tuple[str, type], Op] = {}
        for op in (*(o for ops in self.site_ops.values() for o in ops), *self.latent_ops, *self.step_ops,
                   *self.feature_ops):
            if type(op).prepare is not Op.prepare:
                found.setdefault((op.strategy, type(op)), op)
        return tuple(op for _, op in sorted(found.items(), key=lambda kv: (kv[0][0], kv[0][1].__qualname__)))

    @property
    def is_idle(self) -> bool:
        """True when no op was planned: attached processors only pass through."""
        return not (self.site_ops or self.latent_ops or self.rows or self.step_ops or self.feature_ops)

    def active_step_ops(self, state: RunView) -> tuple[Op, ...]:
        """Step ops active in ``state``'s current step."""
        return tuple(op for op in self.step_ops if op.is_active(state))

    def active_site_ops(self, state: RunView) -> dict[str, ActiveOps]:
        """Ops active in ``state``'s current step and pass, per site (sites without any omitted)."""
        active: dict[str, ActiveOps] = {}
        for name, ops in self.site_ops.items():
            on = [op for op in ops if op.is_active(state)]
            if on:
                active[name] = ActiveOps.of(on)
        return active

    def active_feature_ops(self, state: RunView) -> tuple[FeatureOp, ...]:
        """Feature ops active in ``state``'s current step and pass."""
        return tuple(op for op in self.feature_ops if op.is_active(state))

    def active_latent_ops(self, state: RunView) -> tuple[LatentOp, ...]:
        """Latent ops active in ``state``'s current step."""
        return tuple(op for op in self.latent_ops if op.is_active(state))
