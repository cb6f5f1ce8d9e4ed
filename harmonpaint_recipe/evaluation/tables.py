"""Summary of per-item results: methods x metrics, mean and sample std (ddof=1) and n.

``null`` values (unavailable) are left out of the mean and counted out of ``n``; a metric
with no value at all shows ``n/a`` with its reason as a footnote.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Mapping

from harmonpaint_recipe.files import atomic_write_text

# paper order (Tables I-III: CS, IR, AS, CMMD), then preservation; True = higher is better
COLUMNS: dict[str, tuple[str, bool, str]] = {
    "cs": ("CS", True, "{:.2f}"),
    "ir": ("IR", True, "{:.3f}"),
    "as": ("AS", True, "{:.3f}"),
    "cmmd": ("CMMD", False, "{:.4f}"),
    "mse": ("MSE", False, "{:.5f}"),
    "psnr": ("PSNR", True, "{:.2f}"),
    "lpips": ("LPIPS", False, "{:.4f}"),
}


def _ordered(keys: list[str]) -> list[str]:
    return [k for k in COLUMNS if k in keys] + [k for k in keys if k not in COLUMNS]


def summarize(
    rows: list[dict], methods: list[str], keys: list[str], set_metrics: Mapping[str, Mapping[str, tuple]] | None = None
) -> list[dict]:
    """One summary dict per method: ``{method, n_items, <k>_mean, <k>_std, <k>_n, reasons}``."""
    set_metrics = set_metrics or {}
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        s: dict = {"method": method, "n_items": len(mine), "reasons": {}}
        for k in keys:
            vals = [r[k] for r in mine if r.get(k) is not None]
            s[f"{k}_n"] = len(vals)
            s[f"{k}_mean"] = sum(vals) / len(vals) if vals else None
            s[f"{k}_std"] = (
                math.sqrt(sum((v - s[f"{k}_mean"]) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
            )
            if not vals:
                s["reasons"][k] = next((r["unavailable_reason"][k] for r in mine if k in r.get("unavailable_reason", {})), "no value")
        for k, per_method in set_metrics.items():
            value, reason = per_method[method]
            s[f"{k}_mean"], s[f"{k}_std"], s[f"{k}_n"] = value, None, len(mine) if value is not None else 0
            if value is None:
                s["reasons"][k] = reason
        out.append(s)
    return out


def _metric_keys(summary: list[dict]) -> list[str]:
    keys = [k[: -len("_mean")] for k in summary[0] if k.endswith("_mean")] if summary else []
    return _ordered(keys)


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else spec.format(v)


def render_csv(summary: list[dict]) -> str:
    """CSV with columns ``method, n_items, <k>_mean, <k>_std, <k>_n ...`` (empty = unavailable)."""
    keys = _metric_keys(summary)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "n_items"] + [f"{k}_{p}" for k in keys for p in ("mean", "std", "n")])
    for s in summary:
        w.writerow([s["method"], s["n_items"]] + [
            "" if s[f"{k}_{p}"] is None else repr(float(s[f"{k}_{p}"])) if p != "n" else s[f"{k}_n"]
            for k in keys for p in ("mean", "std", "n")
        ])
    return buf.getvalue()


def render_markdown(summary: list[dict], title: str, notes: list[str] | None = None) -> str:
    """A Markdown table in the paper's layout: ``mean ± std`` per cell, ``n`` last."""
    keys = _metric_keys(summary)
    head = [f"{COLUMNS.get(k, (k.upper(),))[0]} {'↑' if COLUMNS.get(k, ('', True))[1] else '↓'}" for k in keys]
    lines = [f"# {title}", "", "| Method | " + " | ".join(head) + " | n |", "|---" * (len(keys) + 2) + "|"]
    footnotes: dict[str, int] = {}
    for s in summary:
        cells = []
        for k in keys:
            spec = COLUMNS.get(k, ("", True, "{:.4f}"))[2]
            mean, std = s[f"{k}_mean"], s[f"{k}_std"]
            if mean is None:
                reason = s["reasons"].get(k, "no value")
                n = footnotes.setdefault(reason, len(footnotes) + 1)
                cells.append(f"n/a [{n}]")
            else:
                cells.append(_fmt(mean, spec) + (f" ± {_fmt(std, spec)}" if std is not None else ""))
        lines.append(f"| {s['method']} | " + " | ".join(cells) + f" | {s['n_items']} |")
    lines.append("")
    lines += notes or []
    lines.append("mean ± sample std (ddof=1) over items; CMMD is one value per method (set metric, x1000).")
    for reason, n in footnotes.items():
        lines.append(f"[{n}] unavailable: {reason}")
    return "\n".join(lines) + "\n"


def write_tables(summary: list[dict], out: Path, title: str, metrics: Mapping | None = None) -> tuple[Path, Path]:
    """Write ``summary.csv`` and ``summary.md`` atomically; return their paths."""
    notes = []
    preserve = (metrics or {}).get("preserve")
    if preserve is not None:
        measured = "/".join(k.upper() for k in preserve.keys)
        notes.append(f"{measured} on the unmasked region, mode '{preserve.mode}'.")
    csv_path, md_path = Path(out) / "summary.csv", Path(out) / "summary.md"
    atomic_write_text(csv_path, render_csv(summary))
    atomic_write_text(md_path, render_markdown(summary, title, notes))
    return csv_path, md_path
