"""Page controls derived from parameter dataclasses, not written by hand.

Every strategy declares its parameters as a dataclass (``StrategySpec.params``) with
defaults and ``metadata["help"]``; the recipe schema does the same for the sampler. This
module turns the ``bool``/``int``/``float`` fields of those dataclasses into
``ParamControl`` descriptions that the page renders as checkboxes and number boxes, so a
newly installed strategy plugin gets its controls without any UI code. Parameters of
other types (selectors, dicts, lists) stay editable through recipe files and overrides.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from attnctl.errors import InputError
from harmonpaint_recipe.schema import OutputConfig, RecipeConfig, SamplerConfig

#: parameter types that get a control on the page
EDITABLE_TYPES: tuple[type, ...] = (bool, int, float)
#: sampler/recipe keys shown in the "Sampler" section, in this order
SAMPLER_KEYS: tuple[str, ...] = ("sampler.steps", "sampler.guidance_scale", "sampler.strength", "eta")
#: what the page accepts for those keys: (low, high, low included); the recipe schema sets no
#: bounds, but a page shared by several people should not queue a million-step run
SAMPLER_RANGES: dict[str, tuple[float, float, bool]] = {
    "sampler.steps": (1, 1000, True),  # at most the schedulers' 1000 training timesteps
    "sampler.guidance_scale": (0.0, 100.0, True),
    "sampler.strength": (0.0, 1.0, False),
    "eta": (0.0, 1.0, True),
    "output.paste_blur": (0.0, 32.0, True),
}


@dataclass(frozen=True)
class ParamControl:
    """One editable recipe value.

    Attributes:
        key: dotted recipe key, e.g. ``strategies.makvs.scale``.
        name: the parameter's own name (``scale``), used as the label.
        kind: ``bool``, ``int`` or ``float``.
        default: the dataclass default (shown in the help line).
        help: the dataclass field's help text.
        instance: the strategy instance it belongs to (``None`` for sampler values).
        strategy: the strategy type of that instance.
    """

    key: str
    name: str
    kind: type
    default: Any
    help: str
    instance: str | None = None
    strategy: str | None = None

    @property
    def info(self) -> str:
        """Help text with the default, as shown under the control."""
        default = _format(self.default) if self.default is not None else "none"
        return f"{self.help} (default {default})" if self.help else f"default {default}"

    def applies_to(self, recipe: Mapping[str, Any]) -> bool:
        """Whether ``recipe`` (resolved dict) has the value this control edits."""
        if self.instance is None:
            return True
        settings = (recipe.get("strategies") or {}).get(self.instance)
        return isinstance(settings, Mapping) and str(settings.get("strategy", self.instance)) == self.strategy

    def read(self, recipe: Mapping[str, Any]) -> Any:
        """The value in ``recipe`` (resolved dict), or the default when the recipe omits it."""
        node: Any = recipe
        for part in self.key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return self.default
            node = node[part]
        return node

    def coerce(self, value: Any) -> Any:
        """A value from the page converted to ``kind``; ``InputError`` naming the key if impossible."""
        if self.kind is bool:
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise InputError(f"{self.key}: expected true or false, got {_shown(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            number = math.nan
        if isinstance(value, bool) or not math.isfinite(number):
            raise InputError(f"{self.key}: enter a number (default {_format(self.default)}), got {_shown(value)}")
        if self.kind is int and not number.is_integer():
            raise InputError(f"{self.key}: expected a whole number, got {_shown(value)}")
        number = int(number) if self.kind is int else number
        if self.key in SAMPLER_RANGES:
            low, high, low_included = SAMPLER_RANGES[self.key]
            if not (low <= number if low_included else low < number) or number > high:
                span = (f"from {_format(low)} to {_format(high)}" if low_included
                        else f"above {_format(low)}, at most {_format(high)}")
                raise InputError(f"{self.key}: enter a number {span}, got {_shown(value)}")
        return number


@dataclass(frozen=True)
class StrategyGroup:
    """The controls of one strategy instance: its on/off switch, then its parameters."""

    instance: str
    strategy: str
    summary: str
    enabled: ParamControl
    params: tuple[ParamControl, ...]

    @property
    def controls(self) -> tuple[ParamControl, ...]:
        return (self.enabled, *self.params)


def dataclass_controls(params: type, prefix: str, instance: str | None = None, strategy: str | None = None) -> list[ParamControl]:
    """A control for every ``bool``/``int``/``float`` field of the dataclass ``params``."""
    hints = typing.get_type_hints(params)
    out = []
    for f in dataclasses.fields(params):
        kind = hints[f.name]
        if kind not in EDITABLE_TYPES:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(ParamControl(f"{prefix}{f.name}", f.name, kind, default, f.metadata.get("help", ""), instance, strategy))
    return out


def sampler_controls() -> list[ParamControl]:
    """Controls of the recipe's numeric sampler settings and ``eta`` (from the schema dataclasses)."""
    found = {c.key: c for c in dataclass_controls(SamplerConfig, "sampler.") + dataclass_controls(RecipeConfig, "")}
    return [found[key] for key in SAMPLER_KEYS if key in found]


def output_controls() -> list[ParamControl]:
    """Controls of the recipe's ``output`` section (paste-back and its soft edge)."""
    return dataclass_controls(OutputConfig, "output.")


def strategy_groups(recipe: Mapping[str, Any], manager: Any) -> list[StrategyGroup]:
    """One group per strategy instance of ``recipe`` (resolved dict), in recipe order."""
    groups = []
    for instance, settings in (recipe.get("strategies") or {}).items():
        strategy = str((settings or {}).get("strategy", instance))
        spec = manager.spec(strategy, f"strategies.{instance}")
        enabled = ParamControl(
            f"strategies.{instance}.enabled", "enabled", bool, True,
            f"run {instance} ({strategy}); off = this recipe without it", instance, strategy,
        )
        params = dataclass_controls(spec.params, f"strategies.{instance}.", instance, strategy)
        groups.append(StrategyGroup(instance, strategy, spec.summary, enabled, tuple(params)))
    return groups


def merge_groups(group_lists: Iterable[Sequence[StrategyGroup]]) -> list[StrategyGroup]:
    """The union of several recipes' groups, keyed by (instance, strategy), first seen first."""
    seen: dict[tuple[str, str], StrategyGroup] = {}
    for groups in group_lists:
        for group in groups:
            seen.setdefault((group.instance, group.strategy), group)
    return list(seen.values())


def changed_values(recipe: Mapping[str, Any], controls: Sequence[ParamControl], values: Sequence[Any]) -> dict[str, Any]:
    """``{key: value}`` for the controls that apply to ``recipe`` and differ from its values."""
    if len(controls) != len(values):
        raise ValueError(f"{len(controls)} controls but {len(values)} values")
    out: dict[str, Any] = {}
    for control, raw in zip(controls, values):
        if not control.applies_to(recipe):
            continue
        value = control.coerce(raw)
        if value != control.read(recipe):
            out[control.key] = value
    return out


def _shown(value: Any, limit: int = 40) -> str:
    """A value the page sent, quoted and shortened for a message."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format(value: Any) -> str:
    """A value as written on the command line (YAML): ``true``, ``20``, ``1.4``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def override_strings(values: Mapping[str, Any]) -> list[str]:
    """``{"strategies.makvs.enabled": False}`` -> ``["strategies.makvs.enabled=false"]``."""
    return [f"{key}={_format(value)}" for key, value in values.items()]
