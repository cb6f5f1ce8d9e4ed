"""Strategy descriptions and parameter validation.

A strategy declares its parameters as a dataclass with defaults; ``field(metadata=
{"help": ...})`` documents each one. Configs arrive as plain mappings (from YAML or
Python) and are turned into that dataclass here, with errors that name the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from attnctl.errors import ConfigError, did_you_mean

#: keys every strategy instance accepts besides its own parameters
COMMON_KEYS = ("strategy", "enabled")


def help_text(text: str) -> dict:
    """A parameter field's metadata with its help line: ``field(default=..., metadata=help_text("..."))``."""
    return {"help": text}


@dataclass(frozen=True)
class StrategySpec:
    """What a plugin provides: a named strategy and its parameter dataclass.

    Attributes:
        name: strategy type name used in configs (``strategy: <name>``).
        summary: one line shown by ``attnctl strategies``.
        params: dataclass type whose fields (all with defaults) are the parameters.
    """

    name: str
    summary: str
    params: type

    def parameter_table(self) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) for every parameter, in declaration order."""
        rows = []
        hints = typing.get_type_hints(self.params)
        for f in dataclasses.fields(self.params):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
        return rows


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` converted to ``tp`` where that is lossless; raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, (list, tuple)):
            (item_tp, *_) = typing.get_args(tp) or (Any,)
            return tuple(check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    elif origin is dict or tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def build_params(spec: StrategySpec, config: Mapping[str, Any], where: str) -> Any:
    """Build ``spec.params`` from ``config`` (common keys ignored).

    Raises:
        ConfigError: unknown key (with the closest valid one) or wrong type.
    """
    hints = typing.get_type_hints(spec.params)
    fields = {f.name for f in dataclasses.fields(spec.params)}
    kwargs = {}
    for key, value in config.items():
        if key in COMMON_KEYS:
            continue
        if key not in fields:
            valid = sorted(fields | set(COMMON_KEYS))
            raise ConfigError(
                f"unknown parameter '{where}.{key}' for strategy '{spec.name}'"
                f"{did_you_mean(key, valid)}; valid keys: {', '.join(valid)}"
            )
        kwargs[key] = check_type(value, hints[key], f"{where}.{key}")
    try:
        params = spec.params(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return params
