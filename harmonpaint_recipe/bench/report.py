"""Write a benchmark result as JSON, a Markdown table and a PNG bar chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_MIB = 2**20


def _mem(nbytes: float | None) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / _MIB:.0f} MiB"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown_table(result: dict[str, Any]) -> str:
    """The results table (one row per variant) followed by the targets that apply."""
    meta = result["meta"]
    cfg = meta["config"]
    cpu = cfg["device"].startswith("cpu")
    mem_head = "peak RSS increase" if cpu else "peak allocated"
    # a transformer steps with its flow-matching scheduler; FLUX's guidance scale is an input, not CFG
    transformer = "transformer_parameters" in meta["arch"]
    sampling = (f"{cfg['steps']} flow-matching steps, guidance {cfg['guidance_scale']}" if transformer
                else f"{cfg['steps']} DDIM steps, CFG {cfg['guidance_scale']}")
    lines = [
        f"`{meta['arch']['name']}`, {cfg['size']}x{cfg['size']}, {sampling}, "
        f"{cfg['dtype']}, {meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['date']}; "
        f"{cfg['repeats']} repeats + {cfg['warmup']} warm-up, interleaved{', torch.compile' if cfg['compile'] else ''}"
        + (f"; load average {meta['load_average']['before'][0]} before, {meta['load_average']['after'][0]} after"
           if meta.get("load_average", {}).get("before") and meta["load_average"].get("after") else ""),
        "",
        f"| variant | s/image (median) | min - max | it/s | time vs stock | min vs stock min | {mem_head} | memory vs stock |"
        + (" VmHWM increase | VmHWM vs stock |" if cpu else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if cpu else ""),
    ]
    for name, v in result["variants"].items():
        t = v["sec_per_image"]
        pm = v["peak_memory"]
        row = (f"| {name} | {t['median']:.3f} | {t['min']:.3f} - {t['max']:.3f} | {v['it_per_s']:.2f} | "
               f"{_ratio(v['time_ratio'])} | {_ratio(v.get('time_ratio_min'))} | {_mem(pm['median_bytes'])} | "
               f"{_ratio(v['memory_ratio'])} |")
        if cpu:
            row += f" {_mem(pm.get('hwm_median_bytes'))} | {_ratio(v.get('hwm_memory_ratio'))} |"
        lines.append(row)
    compiled = {n: v for n, v in result["variants"].items() if "dynamo" in v}
    if compiled:
        eager = result["variants"].get("stock-eager", {}).get("sec_per_image", {}).get("median")
        lines += ["", "| variant (torch.compile) | compile time (warm-up beyond steady) | time vs eager stock | "
                  "graphs compiled | graph breaks | frames left eager | unsupported |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for n, v in compiled.items():
            d, warm, steady = v["dynamo"], v.get("warmup_seconds") or [], v["sec_per_image"]["median"]
            compile_s = f"{sum(warm) - len(warm) * steady:.1f} s" if warm and n != "stock-eager" else "-"
            vs_eager = _ratio(steady / eager) if eager else "-"
            lines.append(f"| {n} | {compile_s} | {vs_eager} | {d.get('graphs', 0)} | {d.get('graph_breaks', 0)} | "
                         f"{d.get('frames_failed', 0)} | {d.get('unsupported', 0)} |")
        why = {n: v["dynamo_unsupported"] for n, v in result["variants"].items() if v.get("dynamo_unsupported")}
        for n, reasons in why.items():
            lines.append("")
            lines.append(f"{n}, unsupported by dynamo: " + "; ".join(f"{r} (x{c})" for r, c in reasons.items()))
    if result["targets"]:
        lines += ["", "| target | limit | measured | met |", "|---|---:|---:|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['variant']} {t['metric']} ({t['setting']}) | {'<' if t['metric'] == 'peak_gb' else '<='} "
                         f"{t['limit']} | {t['value']:.3f} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def bar_chart(result: dict[str, Any], path: Path) -> None:
    """Two panels: time and peak memory per variant as ratios to stock (min-max whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    vs = [result["variants"][n] for n in names]
    stock_t = result["variants"]["stock"]["sec_per_image"]["median"]
    t_med = [v["time_ratio"] for v in vs]
    t_err = [[r - v["sec_per_image"]["min"] / stock_t for r, v in zip(t_med, vs)],
             [v["sec_per_image"]["max"] / stock_t - r for r, v in zip(t_med, vs)]]
    m_med = [v["memory_ratio"] or 0.0 for v in vs]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = ["#7f7f7f", "#1f77b4", "#2ca02c", "#ff7f0e", "#d62728"]
    axes[0].bar(names, t_med, yerr=t_err, capsize=4, color=colors[: len(names)])
    axes[0].set_title("time per image / stock (median, min-max)")
    axes[1].bar(names, m_med, color=colors[: len(names)])
    axes[1].set_title("peak memory / stock")
    tops = ([r + up for r, up in zip(t_med, t_err[1])], m_med)  # label above the whisker
    for ax, vals, top in zip(axes, (t_med, m_med), tops):
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.tick_params(axis="x", rotation=20)
        for i, (val, y) in enumerate(zip(vals, top)):
            ax.annotate(f"{val:.2f}", (i, y), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(top) * 1.12)
    meta = result["meta"]
    cfg = meta["config"]
    fig.suptitle(f"{meta['arch']['name']} {cfg['size']}px {cfg['steps']} steps {cfg['dtype']} - {meta['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(result: dict[str, Any], out: str | Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md", "chart": out / "bench.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown_table(result), encoding="utf-8")
    bar_chart(result, paths["chart"])
    return paths
