"""attnctl: attention control for diffusers pipelines.

Quick use::

    import attnctl
    with attnctl.attach(pipe, {"strategies": {...}}) as ctl:
        layout = attnctl.BatchLayout.for_pipeline(num_prompts=1, cfg=True)
        with ctl.run(layout, mask=mask):
            image = pipe(...).images[0]
"""

from attnctl.adapters import MIRROR, AdapterRegistry, CoreCall, ProcessorAdapter, SdpaAdapter
from attnctl.attention import AttentionCall
from attnctl.controller import Controller, attach
from attnctl.errors import (
    AttnctlError,
    ConfigError,
    InputError,
    ProcessorReplacedError,
    RunWarning,
    SelectorError,
    UnsupportedModelError,
    UnsupportedProcessorError,
)
from attnctl.guidance import GuidanceContext
from attnctl.ops import ActiveOps, GateOp, KeyValueOp, LatentOp, ObserveOp, ReweightOp, SiteOp
from attnctl.params import StrategySpec
from attnctl.plan import Plan, compile_plan
from attnctl.plugins import StrategyManager, hookimpl
from attnctl.run_state import BatchLayout, RunState
from attnctl.selectors import select_sites
from attnctl.sites import Site, SiteTable, describe_sites

__version__ = "0.1.0"

__all__ = [
    "MIRROR", "ActiveOps", "AdapterRegistry", "AttentionCall", "AttnctlError", "BatchLayout", "ConfigError",
    "Controller", "CoreCall", "GateOp", "GuidanceContext", "InputError", "KeyValueOp", "LatentOp", "ObserveOp",
    "Plan", "ProcessorAdapter", "ProcessorReplacedError", "ReweightOp", "RunState", "RunWarning", "SdpaAdapter",
    "SelectorError", "Site", "SiteOp", "SiteTable", "StrategyManager", "StrategySpec", "UnsupportedModelError",
    "UnsupportedProcessorError", "attach", "compile_plan", "describe_sites", "hookimpl", "select_sites",
]
