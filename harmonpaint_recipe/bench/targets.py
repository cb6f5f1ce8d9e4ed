"""The performance targets of issue 5, checked against a result when device and arch match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Target:
    """``variant``'s ``metric`` must be <= ``limit`` (``peak_gb``: strictly below).

    ``metric`` is ``time_ratio`` / ``memory_ratio`` (to ``stock``, same run) or ``peak_gb``.
    ``setting`` names the run the target is defined for (steps, size, dtype).
    """

    device: str
    arch: str
    variant: str
    metric: str
    limit: float
    setting: str


TARGETS: tuple[Target, ...] = (
    Target("cpu", "mid", "idle", "time_ratio", 1.03, "10 steps"),
    Target("cpu", "mid", "sams+makvs", "time_ratio", 1.15, "10 steps"),
    Target("cuda", "sd15-inpaint", "idle", "time_ratio", 1.02, "fp16, 512x512, 50 DDIM steps, CFG 7.5"),
    Target("cuda", "sd15-inpaint", "sams+makvs", "time_ratio", 1.10, "fp16, 512x512, 50 DDIM steps, CFG 7.5"),
    Target("cuda", "sd15-inpaint", "harmonpaint", "time_ratio", 1.6, "fp16, 512x512, 50 DDIM steps, CFG 7.5"),
    Target("cuda", "sd15-inpaint", "harmonpaint", "memory_ratio", 1.5, "fp16, 512x512, 50 DDIM steps, CFG 7.5"),
    Target("cuda", "sdxl-inpaint", "harmonpaint", "peak_gb", 40.0, "fp16, 1024x1024"),
    Target("cuda", "sdxl-inpaint", "harmonpaint", "peak_gb", 24.0, "fp16, 1024x1024; goal: a 24 GB card"),
)


def check_targets(device_type: str, arch: str, variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets that apply to this run, each with the measured value and ``met``."""
    rows = []
    for t in TARGETS:
        if t.device != device_type or t.arch != arch or t.variant not in variants:
            continue
        v = variants[t.variant]
        value = v["peak_memory"]["median_bytes"] / 1e9 if t.metric == "peak_gb" else v.get(t.metric)
        if value is None:
            continue
        met = value < t.limit if t.metric == "peak_gb" else value <= t.limit
        rows.append({"variant": t.variant, "metric": t.metric, "limit": t.limit, "value": round(value, 4),
                     "met": bool(met), "setting": t.setting})
    return rows
