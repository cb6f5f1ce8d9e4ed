"""Ops on non-attention modules: rewrite what a named module of the UNet returns.

Some methods act outside attention: StyleAligned computes every GroupNorm's statistics over
the image and its reference together, Plug-and-Play injects ResNet features. A
``FeatureOp`` names its modules with ``modules``, a selector resolved at attach time:

- a class name (``"GroupNorm"``): every module of that class;
- a module name, or a pattern on dotted names with ``*`` wildcards (``"up_blocks.*.resnets.*.norm2"``);
- several of those, comma-separated.

While such an op is planned attnctl puts a forward hook on each module it names; the hook
calls ``apply(call)`` with a ``FeatureCall`` (the module, its arguments, its output, the run
state and the rows) in the steps and passes where the op is active (gates and passes as
every op's), and returns what ``apply`` returns instead of the module's output. Ops on one
module run in instance-name order, each seeing the previous one's output. Outside those
steps the hook returns nothing and the module's own output stands.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from attnctl.errors import ConfigError
from attnctl.ops import MAIN, Op
from attnctl.call import partner_positions

if TYPE_CHECKING:
    import torch

    from attnctl.interfaces import RunView


@dataclass(eq=False)
class FeatureOp(Op):
    """Rewrites the output of the modules ``modules`` selects (see the module docstring). Main pass by default."""

    modules: str = field(kw_only=True)
    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def apply(self, call: FeatureCall) -> torch.Tensor:  # pragma: no cover - interface
        """The output to use instead of ``call.output`` (never modify it in place)."""
        raise NotImplementedError


class FeatureCall:
    """One call of a module a feature op acts on.

    Attributes:
        name: the module's dotted name in the UNet.
        module: the module.
        args: its positional arguments (``args[0]``: its input for norms and ResNet blocks).
        output: its output (after earlier feature ops at this module).
        state: the run state; ``rows`` are the rows of the run's layout in this call's batch.
    """

    def __init__(self, name: str, module: Any, args: tuple, output: Any, state: RunView):
        self.name, self.module, self.args, self.output, self.state = name, module, args, output, state
        self.rows = state.rows

    def take(self, tensor: torch.Tensor, role: str) -> torch.Tensor:
        """``tensor`` [B, ...] re-indexed so row i holds row i's partner of ``role`` (same branch and image)."""
        import torch

        def positions() -> torch.Tensor:  # the same for every module of a call: once per run and rows
            return torch.tensor(partner_positions(self.state, self.rows, role, self.name), device=tensor.device)

        return tensor.index_select(0, self.state.memo(("feature partners", role, self.rows, tensor.device), positions))


def resolve_modules(selector: str, named: list[tuple[str, Any]], where: str) -> list[str]:
    """Names of the modules ``selector`` picks among ``named`` ``(name, module)`` pairs, in model order."""
    parts = [p.strip() for p in selector.split(",") if p.strip()]
    picked = [name for name, module in named
              if any(type(module).__name__ == p or fnmatch.fnmatchcase(name, p) for p in parts)]
    if not picked:
        raise ConfigError(f"{where}: modules='{selector}' names no module of this model; give a class name "
                          "(e.g. GroupNorm) or a dotted-name pattern (e.g. up_blocks.*.resnets.*.norm2)")
    return picked


def feature_modules(ops: tuple[FeatureOp, ...], model: Any) -> dict[str, tuple[FeatureOp, ...]]:
    """Module name -> the feature ops acting on it (instance-name order), resolved in ``model``."""
    named = [(name, module) for name, module in model.named_modules() if name]
    by_module: dict[str, list[FeatureOp]] = {}
    for op in ops:
        for name in resolve_modules(op.modules, named, f"strategies.{op.strategy}"):
            by_module.setdefault(name, []).append(op)
    return {name: tuple(found) for name, found in by_module.items()}


def feature_hook(name: str, ops: tuple[FeatureOp, ...], current: Any) -> Any:
    """A forward hook applying those of ``ops`` active in ``current()``'s step and pass (the run state)."""

    def hook(module, args, output):
        state = current()
        if state is None or not state.active_features:
            return None
        active = [op for op in ops if op in state.active_features]
        if not active:
            return None
        call = FeatureCall(name, module, args, output, state)
        for op in active:
            call.output = op.apply(call)
        return call.output

    return hook
