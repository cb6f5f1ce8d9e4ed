"""Statistics and pictures of the testbed evaluation: bootstrap CIs, markdown tables, plots, grids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from harmonpaint_recipe.testbed.world import dilate

#: per-item values summarized for every method, and those also given as paired differences from SDI
KEYS = ("fidelity", "shape_ok", "colour_ok", "harmony", "harmony_own", "bg_mae", "bg_psnr")
DELTA_KEYS = ("fidelity", "harmony", "bg_mae")


def bootstrap_ci(values: np.ndarray, draws: np.ndarray) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its 95% percentile-bootstrap interval, with
    ``draws`` the resampled item indices ``[B, n]`` (shared across methods, so paired)."""
    means = values[draws].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarize_rows(rows: list[dict], methods: list[str], item_ids: list[str], bootstrap: int, seed: int = 0) -> dict[str, dict]:
    """Per method: mean and CI of every key in ``KEYS`` the rows have, and paired differences
    from SDI (``none``) for ``DELTA_KEYS``."""
    by_key = {(r["method"], r["id"]): r for r in rows}
    draws = np.random.default_rng(seed).integers(0, len(item_ids), size=(bootstrap, len(item_ids)))

    def vector(method: str, key: str) -> np.ndarray | None:
        values = [by_key[(method, i)].get(key) for i in item_ids]
        return None if any(v is None for v in values) else np.array(values, dtype=np.float64)

    out: dict[str, dict] = {}
    for m in methods:
        stats: dict[str, Any] = {"n": len(item_ids)}
        for key in KEYS:
            v = vector(m, key)
            if v is not None:
                stats[key] = bootstrap_ci(v, draws)
        if m != "none" and "none" in methods:
            for key in DELTA_KEYS:
                v, ref = vector(m, key), vector("none", key)
                if v is not None and ref is not None:
                    stats[f"delta_{key}"] = bootstrap_ci(v - ref, draws)
        out[m] = stats
    return out


def cell(stat: tuple[float, float, float] | None, percent: bool = False, digits: int = 3) -> str:
    """``mean [low, high]``, in percent for rates; ``—`` when not measured."""
    if stat is None:
        return "—"
    mean, lo, hi = stat
    if percent:
        return f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def method_table(stats: dict[str, dict], methods: list[str], labels: dict[str, str], with_delta: bool = True) -> list[str]:
    """Markdown rows: fidelity, harmony, background error outside the mask, and differences from SDI."""
    head = ("| method | fidelity % ↑ | harmony ↓ | harmony in its own picture | background MAE ↓ | "
            "background PSNR dB ↑ |")
    sep = "|---|---|---|---|---|---|"
    if with_delta:
        head += " Δ fidelity (pts) | Δ harmony | Δ background MAE |"
        sep += "---|---|---|"
    lines = [head, sep]
    for m in methods:
        s = stats[m]
        row = (f"| {labels.get(m, m)} | {cell(s.get('fidelity'), True)} | {cell(s.get('harmony'))} | "
               f"{cell(s.get('harmony_own'))} | {cell(s.get('bg_mae'), digits=1)} | {cell(s.get('bg_psnr'), digits=1)} |")
        if with_delta:
            if "delta_harmony" in s:
                row += (f" {cell(s.get('delta_fidelity'), True)} | {cell(s.get('delta_harmony'))} | "
                        f"{cell(s.get('delta_bg_mae'), digits=1)} |")
            else:
                row += " — | — | — |"
        lines.append(row)
    return lines


def by_style_table(rows: list[dict], records: list[dict], methods: list[str], labels: dict[str, str]) -> list[str]:
    """Mean harmony per background style (rows: methods)."""
    style_of = {r["id"]: r["style"] for r in records}
    styles = sorted(set(style_of.values()))
    lines = ["| method | " + " | ".join(styles) + " |", "|---" * (len(styles) + 1) + "|"]
    for m in methods:
        cells = []
        for st in styles:
            vals = [r["harmony"] for r in rows if r["method"] == m and style_of[r["id"]] == st and r.get("harmony") is not None]
            cells.append(f"{np.mean(vals):.2f} (n={len(vals)})" if vals else "—")
        lines.append(f"| {labels.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def controls_table(summary: dict[str, dict], labels: dict[str, str]) -> list[str]:
    """Markdown rows of the judge's controls: mean harmony with CI, and per style."""
    from harmonpaint_recipe.testbed.world import STYLES

    lines = ["| control | harmony ↓ (0 = styled truth, 1 = flat paste) | " + " | ".join(STYLES) + " |",
             "|---|---|" + "---|" * len(STYLES)]
    for name, s in summary.items():
        if not isinstance(s, dict):
            continue
        per_style = " | ".join(f"{s['by_style'][st]:.2f}" if st in s["by_style"] else "—" for st in STYLES)
        lines.append(f"| {labels.get(name, name)} | {s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}] | {per_style} |")
    return lines


def lambda_plot(stats: dict[str, dict], lambda_methods: list[tuple[float, str]], labels: dict[str, str], path: Path) -> None:
    """Harmony, fidelity and background error against MAKVS lambda, with SDI and references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = [lam for lam, _ in lambda_methods]
    panels = (("harmony", "harmony ↓ (0 = styled truth, 1 = flat)", 1), ("fidelity", "fidelity % ↑", 100),
              ("bg_mae", "background MAE outside the mask ↓", 1))
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (key, title, scale) in zip(axes, panels):
        mean = np.array([stats[m][key][0] for _, m in lambda_methods]) * scale
        lo = np.array([stats[m][key][1] for _, m in lambda_methods]) * scale
        hi = np.array([stats[m][key][2] for _, m in lambda_methods]) * scale
        ax.errorbar(lams, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3)
        for ref, style in (("none", "--"), ("truth-styled-vae", ":"), ("none+style-words", "-.")):
            if ref in stats and key in stats[ref]:
                ax.axhline(stats[ref][key][0] * scale, linestyle=style, color="gray", linewidth=1)
                ax.text(lams[-1], stats[ref][key][0] * scale, " " + labels.get(ref, ref).split(",")[0][:22], fontsize=6,
                        va="bottom", ha="right", color="gray")
        ax.set_xlabel("MAKVS λ")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison_grid(folders: dict[str, Path], data: Path, records: list[dict], columns: list[str],
                    labels: dict[str, str], count: int, cell_px: int = 96) -> Image.Image:
    """Rows = the first ``count`` items; columns = input (mask outlined), then each method's
    ``folders[method]/<id>.png``."""
    label = 16
    grid = Image.new("RGB", (cell_px * (len(columns) + 1), label + cell_px * min(count, len(records))), "white")
    draw = ImageDraw.Draw(grid)
    for c, name in enumerate(["input + mask"] + [labels.get(m, m).split(" (")[0] for m in columns]):
        draw.text((c * cell_px + 3, 3), name[: cell_px // 6], fill="black")
    for r, rec in enumerate(records[:count]):
        y = label + r * cell_px
        source = Image.open(data / rec["image"]).convert("RGB")
        mask = np.asarray(Image.open(data / rec["mask"]).convert("L")) > 127
        arr = np.asarray(source).copy()
        arr[mask & dilate(~mask, 1)] = (255, 0, 255)  # the mask's outline
        grid.paste(Image.fromarray(arr).resize((cell_px, cell_px), Image.NEAREST), (0, y))
        draw.text((3, y + cell_px - 12), rec["prompt"][2:][: cell_px // 6], fill="white")
        for c, m in enumerate(columns, start=1):
            tile = Image.open(folders[m] / f"{rec['id']}.png").convert("RGB").resize((cell_px, cell_px), Image.NEAREST)
            grid.paste(tile, (c * cell_px, y))
    return grid
