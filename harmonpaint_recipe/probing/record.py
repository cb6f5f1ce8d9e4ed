"""Probe results as JSON numbers: a result's own ``to_record()``, or its dataclass fields."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def _plain(value: Any) -> Any:
    """Numbers, lists and dicts only (numpy arrays and scalars, tuples, NaN -> null)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def result_record(result: Any) -> Any:
    """Every number of one probe's result, JSON-ready.

    Built-in probes (and any probe that wants a layout of its own) define ``to_record()``;
    for other results the fields of a dataclass, or the value itself, are written.
    """
    if hasattr(result, "to_record"):
        return _plain(result.to_record())
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return _plain({f.name: getattr(result, f.name) for f in dataclasses.fields(result)})
    return _plain(result)
