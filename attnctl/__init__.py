"""attnctl: attention control for diffusers pipelines.

Quick use::

    import attnctl
    with attnctl.attach(pipe, {"strategies": {...}}) as ctl:
        layout = attnctl.BatchLayout.for_call(pipe, prompt="a cat", guidance_scale=7.5)
        with ctl.run(layout, mask=mask):
            image = pipe(prompt="a cat", ...).images[0]

Names are imported on first use, so ``import attnctl`` (and the command line's help and
listings) stay fast: torch and diffusers load only when an attach or a run needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnctl.errors import (
    AttnctlError,
    ConfigError,
    InputError,
    PluginWarning,
    ProcessorReplacedError,
    RunError,
    RunWarning,
    SelectorError,
    UnsupportedModelError,
    UnsupportedProcessorError,
)
from attnctl.lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("ActiveOps", "Branch", "BranchOp", "GateOp", "KeyValueOp", "LatentOp", "MapOp", "MeasureOp",
                     "ObserveOp", "ProjectionOp", "ReweightOp", "SiteOp"), "attnctl.ops"),
    **dict.fromkeys(("GuidanceTermOp", "NoiseOp", "PostStepOp", "PredictionOp"), "attnctl.step_ops"),
    **dict.fromkeys(("RowOp", "RowSpec"), "attnctl.rows"),
    **dict.fromkeys(("MIRROR", "AdapterRegistry", "CoreCall", "ProcessorAdapter", "SdpaAdapter"), "attnctl.adapters"),
    **dict.fromkeys(("Controller", "attach"), "attnctl.controller"),
    **dict.fromkeys(("StrategyManager", "hookimpl"), "attnctl.plugins"),
    **dict.fromkeys(("Site", "SiteTable", "describe_sites"), "attnctl.sites"),
    "AttentionCall": "attnctl.call",
    "BatchLayout": "attnctl.layout",
    "GuidanceContext": "attnctl.guidance",
    "Plan": "attnctl.plan",
    "RunState": "attnctl.run_state",
    "StrategySpec": "attnctl.params",
    "compile_plan": "attnctl.planning",
    "select_sites": "attnctl.selectors",
}

__all__ = sorted([
    *_EXPORTS, "AttnctlError", "ConfigError", "InputError", "PluginWarning", "ProcessorReplacedError", "RunError",
    "RunWarning", "SelectorError", "UnsupportedModelError", "UnsupportedProcessorError",
])


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from attnctl.adapters import MIRROR, AdapterRegistry, CoreCall, ProcessorAdapter, SdpaAdapter
    from attnctl.call import AttentionCall
    from attnctl.controller import Controller, attach
    from attnctl.guidance import GuidanceContext
    from attnctl.layout import BatchLayout
    from attnctl.ops import (ActiveOps, Branch, BranchOp, GateOp, KeyValueOp, LatentOp, MapOp, MeasureOp, ObserveOp,
                             ProjectionOp, ReweightOp, SiteOp)
    from attnctl.rows import RowOp, RowSpec
    from attnctl.step_ops import GuidanceTermOp, NoiseOp, PostStepOp, PredictionOp
    from attnctl.params import StrategySpec
    from attnctl.plan import Plan
    from attnctl.planning import compile_plan
    from attnctl.plugins import StrategyManager, hookimpl
    from attnctl.run_state import RunState
    from attnctl.selectors import select_sites
    from attnctl.sites import Site, SiteTable, describe_sites
