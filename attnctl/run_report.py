"""What a run will not do, or did not do, as planned: warnings that name the strategy and the site.

- Before the first step: a strategy instance whose gates are closed at every timestep the
  run has left (e.g. a strategy gated to t/T >= 0.6 in a run with ``strength=0.6``, which
  starts at t/T < 0.6) cannot act; the user is told up front.
- After the run: a site where ops were due in some step but never ran (its processor was
  replaced behind attnctl's back, or the module was never called) is reported.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Sequence

from attnctl.errors import RunWarning
from attnctl.ops import GUIDANCE, MAIN

if TYPE_CHECKING:
    from attnctl.plan import Plan
    from attnctl.layout import BatchLayout
    from attnctl.run_state import RunState


def qualified(plan: Plan, instance: str) -> str:
    """``strategies.NAME`` or ``probes.NAME``: where the instance is configured."""
    return f"{'probes' if instance in plan.probes else 'strategies'}.{instance}"


def planned_instances(plan: Plan) -> list[str]:
    """Instances that planned site or latent ops, in plan order."""
    names = ([op.strategy for ops in plan.site_ops.values() for op in ops] + [op.strategy for op in plan.latent_ops]
             + [op.strategy for op in plan.step_ops])
    return list(dict.fromkeys(names))


def idle_instances(plan: Plan, layout: BatchLayout, timesteps: Sequence[float], remaining: Sequence[float],
                   num_train_timesteps: int) -> list[str]:
    """Instances with ops whose gates keep them off at every timestep in ``remaining``.

    ``timesteps`` is the scheduler's whole schedule (so gates on the step index see true
    indices); ``remaining`` the part of it this run will still go through.
    """
    from attnctl.run_state import RunState

    probe = RunState(plan, layout, num_train_timesteps=num_train_timesteps, timesteps=list(timesteps))
    active: set[str] = set()
    for t in remaining:
        try:
            probe.begin_step(float(t), prepare=False)
        except Exception:  # a gate that needs more than the time cannot be previewed
            return []
        for kind in (MAIN, GUIDANCE):
            active.update(op.strategy for ops in probe.active_in(kind).values() for op in ops.all)
        active.update(op.strategy for op in probe.active_latent_ops + probe.active_step_ops)
    return [name for name in planned_instances(plan) if name not in active]


def warn_idle_instances(plan: Plan, names: list[str], remaining: Sequence[float], num_train_timesteps: int) -> None:
    """One warning per instance that cannot act in this run."""
    if not names or not remaining:
        return
    t_hi, t_lo = (float(max(remaining)) / num_train_timesteps, float(min(remaining)) / num_train_timesteps)
    for name in names:
        gates = ", ".join(f"strategies.{g.strategy}: {g.gate}" for g in plan.gated_by.get(name, ())) or "its own gates"
        warnings.warn(
            f"{qualified(plan, name)} will not act in this run: its gates ({gates}) are closed at all {len(remaining)} "
            f"remaining steps (t/T from {t_hi:.3f} down to {t_lo:.3f}). A strength below 1 starts the run at a "
            "lower t and skips strategies gated to early steps; see docs/recipes.md (timestep gating).",
            RunWarning,
            stacklevel=4,
        )


def warn_sites_not_run(state: RunState, processors: dict[str, object]) -> None:
    """One warning per site whose ops were due in some step but never ran."""
    missed = [name for name in state.plan.site_ops if name in state.sites_due and not state.sites_run.get(name)]
    for name in missed:
        site = state.plan.sites.by_name(name)
        instances = sorted({op.strategy for op in state.plan.site_ops[name]})
        current = type(processors.get(name)).__name__
        warnings.warn(
            f"{', '.join(qualified(state.plan, i) for i in instances)} planned at {site.key} ({name}) never ran there in "
            f"this run although due: the site's attention did not go through attnctl (its processor is now "
            f"{current}; was it replaced during the run, or the module skipped?)",
            RunWarning,
            stacklevel=4,
        )
