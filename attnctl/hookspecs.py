"""Hook specifications of attnctl, grouped by phase.

A strategy plugin is a module (or object) with functions decorated by
``attnctl.hookimpl`` and named like the specs below. Plugins are found through the
entry-point group ``attnctl.strategies``; built-in strategies register that way too.

pluggy is used at attach time only (discovery, validation, planning) and once at the
start and end of a run; it is never called inside an attention call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pluggy

if TYPE_CHECKING:
    from attnctl.ops import Op
    from attnctl.params import StrategySpec
    from attnctl.plan import Plan
    from attnctl.run_state import RunState
    from attnctl.sites import SiteTable

hookspec = pluggy.HookspecMarker("attnctl")


# -------------------------------------------------------------------------------------
# Discovery
# -------------------------------------------------------------------------------------


@hookspec
def attnctl_add_strategies() -> Sequence[StrategySpec]:
    """Return the strategies this plugin provides.

    :returns: ``StrategySpec`` objects; each ``name`` must be unique across all plugins.

    Called once when the plugin manager collects strategies.
    """


@hookspec
def attnctl_add_processor_adapters() -> Mapping[type | str, Any]:
    """Return adapters for attention processor classes this plugin knows how to run.

    :returns: processor class (or its qualified name, ``"package.module.Class"``) ->
        adapter object with ``run(core, original, attn, hidden_states, *args, **kwargs)``
        and a ``guidance_mirror`` flag; ``attnctl.SdpaAdapter()`` fits any processor that
        computes its attention with one ``scaled_dot_product_attention`` call.

    Strategies act at a site only through the adapter of the site's processor class;
    without one, ``attach`` refuses the site. Called once per attach.
    """


@hookspec
def attnctl_add_backbones() -> Sequence[Any]:
    """Return backbones for denoising networks attnctl does not know (``attnctl.backbones``).

    :returns: objects with ``name``, ``classes`` (the network class names they describe),
        ``is_transformer``, ``describe_sites(model)`` and ``call_info(model, args, kwargs)``.

    A plugin's backbone is tried before the built-in ones. Called once per attach.
    """


# -------------------------------------------------------------------------------------
# Validation
# -------------------------------------------------------------------------------------


@hookspec
def attnctl_validate(instances: Mapping[str, tuple[StrategySpec, Any]], sites: SiteTable) -> None:
    """Check the enabled strategy instances as a whole; raise ``ConfigError`` to refuse.

    :param instances: enabled instance name -> (spec, params dataclass), after each
        instance's own parameters were validated.
    :param sites: the sites of the model being attached to.

    Use it for checks that span instances (e.g. a gate that names an unknown instance).
    Every implementation is called.
    """


# -------------------------------------------------------------------------------------
# Planning
# -------------------------------------------------------------------------------------


@hookspec
def attnctl_plan(instance: str, spec: StrategySpec, params: Any, sites: SiteTable) -> Sequence[Op] | None:
    """Plan one enabled strategy instance: return its ops, or ``None`` if ``spec`` is not yours.

    :param instance: the instance name in the config (e.g. ``"sams"``); use it as every
        op's ``strategy`` so gates and scratch space find it.
    :param spec: the instance's strategy spec (check ``spec.name`` to know if it is yours).
    :param params: the validated parameter dataclass.
    :param sites: the sites of the model; resolve site selectors against it.

    Exactly one plugin must answer for each instance. The returned ops are compiled into
    a static per-site list at attach time.
    """


# -------------------------------------------------------------------------------------
# Run
# -------------------------------------------------------------------------------------


@hookspec
def attnctl_run_start(state: RunState, plan: Plan) -> None:
    """Called once when a pipeline run starts, after the run state was created.

    :param state: the new run state (batch layout, masks, token indices, scratch).
    :param plan: the compiled plan.

    Use it to fill ``state.scratch[instance]`` with per-run data.
    """


@hookspec
def attnctl_run_end(state: RunState, plan: Plan) -> None:
    """Called once when a pipeline run ends (also after an error), before the state is dropped.

    :param state: the run state of the run that ends.
    :param plan: the compiled plan.
    """
