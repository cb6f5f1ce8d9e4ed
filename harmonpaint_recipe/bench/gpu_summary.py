"""The files ``attnctl gpu-check`` writes, assembled from the parts' result records.

At most eight files, each only when there is something to put in it:

- ``summary.md``: what ran (status, wall time against the estimate), the test counts, the
  parity table, every benchmark table, the torch.compile table and every target, met or not;
- ``suite.log``: the progress lines of every part (written by ``gpu_check``);
- ``gpu-tests.txt``: pytest's output (written by ``gpu_check``);
- ``parity.json``: the parity record (``bench.parity``);
- ``bench.json``: ``{part: benchmark record}`` for ``sd15``, ``sdxl``, ``sd2``;
- ``bench.md``: their tables (``bench.report.markdown_table``);
- ``bench.png``: the ``sd15`` chart (``bench.report.bar_chart``);
- ``compile.json``: the ``compile`` record plus per-variant compile time and steady-state
  time, and the comparison with eager ``stock`` from ``sd15``.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harmonpaint_recipe.bench.parity import parity_table
from harmonpaint_recipe.bench.report import bar_chart, markdown_table

if TYPE_CHECKING:
    from harmonpaint_recipe.bench.gpu_check import PartRecord, SuiteOptions

BENCH_PARTS: tuple[str, ...] = ("sd15", "sdxl", "sd2")
OUTPUT_FILES: tuple[str, ...] = ("summary.md", "suite.log", "gpu-tests.txt", "parity.json", "bench.json",
                                 "bench.md", "bench.png", "compile.json")
MAX_FILE_BYTES = 16 * 2**20
_GB = 1e9


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _gpu_from_nvidia_smi() -> str | None:
    """GPU name, memory and driver without creating a CUDA context in this process."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def compile_report(compiled: dict[str, Any], eager: dict[str, Any] | None) -> dict[str, Any]:
    """Per variant: compile time (first warm-up run less the steady median), steady time,
    dynamo counts; and compiled times against eager ``stock`` when both runs used the same settings."""
    cfg = compiled["meta"]["config"]
    comparable = eager is not None and all(
        eager["meta"]["config"].get(k) == cfg.get(k) for k in ("arch", "size", "steps", "dtype", "device", "guidance_scale"))
    eager_stock = eager["variants"]["stock"]["sec_per_image"]["median"] if comparable else None
    rows = {}
    for name, v in compiled["variants"].items():
        steady = v["sec_per_image"]["median"]
        warm = v.get("warmup_seconds") or []
        rows[name] = {
            "compile_s": round(warm[0] - steady, 3) if warm else None,
            "first_run_s": warm[0] if warm else None,
            "steady_sec_per_image": steady,
            "vs_compiled_stock": v["time_ratio"],
            "vs_eager_stock": steady / eager_stock if eager_stock else None,
            "graphs": v.get("dynamo", {}).get("graphs"),
            "graph_breaks": v.get("dynamo", {}).get("graph_breaks"),
            "frames_left_eager": v.get("dynamo", {}).get("frames_failed"),
            "unsupported": v.get("dynamo_unsupported", {}),
            "finite_output": v["finite_output"],
        }
    return {"eager_stock_sec_per_image": eager_stock,
            "eager_comparable": comparable, "variants": rows}


def _targets(records: dict[str, PartRecord]) -> list[tuple[str, str, str, bool | None]]:
    """(what, limit, measured, met) for every target that applies to what ran."""
    rows: list[tuple[str, str, str, bool | None]] = []
    for part in BENCH_PARTS:
        rec = records.get(part)
        if rec is None or rec.result is None:
            continue
        for t in rec.result["targets"]:
            op = "<" if t["metric"] == "peak_gb" else "<="
            rows.append((f"{part}: {t['variant']} {t['metric']} ({t['setting']})", f"{op} {t['limit']}",
                         f"{t['value']:.3f}", t["met"]))
    comp = records.get("compile")
    if comp is not None and comp.result is not None:
        sd15 = records.get("sd15")
        report = compile_report(comp.result, sd15.result if sd15 is not None else None)
        hp = report["variants"].get("harmonpaint", {})
        if hp.get("vs_eager_stock") is not None:
            rows.append(("compile: compiled harmonpaint time vs eager stock (stretch)", "<= 1.0",
                         f"{hp['vs_eager_stock']:.3f}", hp["vs_eager_stock"] <= 1.0))
        for name, v in report["variants"].items():
            if v.get("graph_breaks") is not None:
                lost = v["graph_breaks"] + (v.get("frames_left_eager") or 0)
                rows.append((f"compile: {name} graph breaks + frames left eager", "0", str(lost), lost == 0))
    par = records.get("parity")
    if par is not None and par.result is not None:
        for recipe, by_dtype in par.result["recipes"].items():
            for dtype, row in by_dtype.items():
                rows.append((f"parity: {recipe} {dtype} latents finite", "all steps", "yes" if row["finite"] else "no",
                             row["finite"]))
    return rows


def _mem_gb(v: dict[str, Any]) -> float:
    return v["peak_memory"]["median_bytes"] / _GB


def _summary(records: list[PartRecord], opts: SuiteOptions, t0: float) -> str:
    by_name = {r.name: r for r in records}
    meta = next((r.result["meta"] for r in records if r.result and "meta" in r.result), None)
    gpu = _gpu_from_nvidia_smi()
    lines = ["# attnctl GPU check", ""]
    lines.append(f"- device: {meta['device'] if meta else 'unknown (no part finished)'}" + (f" (nvidia-smi: {gpu})" if gpu else ""))
    lines.append(f"- torch {_version('torch')}, diffusers {_version('diffusers')}, transformers {_version('transformers')}, "
                 f"attnctl {_version('attnctl')}, Python {platform.python_version()}")
    lines.append(f"- {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}; budget {opts.budget:.0f} s, "
                 f"used {time.time() - t0:.0f} s; architecture `{opts.arch}`")
    lines += ["", "| part | what | status | wall s | H200 estimate s | note |", "|---|---|---|---:|---:|---|"]
    for r in records:
        wall = "-" if r.wall_s is None else f"{r.wall_s:.0f}"
        note = (r.reason or "").replace("|", "/")
        lines.append(f"| {r.name} | {r.title} | {r.status} | {wall} | {r.estimate_s:.0f} | {note} |")
    not_done = [r.name for r in records if r.status in ("skipped", "timed out", "pending")]
    if not_done:
        lines += ["", f"Not done: {', '.join(not_done)}; run them alone with `--only {','.join(not_done)}`."]

    tests = by_name.get("tests")
    if tests is not None and tests.result is not None:
        counts = tests.result["counts"]
        lines += ["", "## Tests", "", f"`{tests.result['command']}`: "
                  + (", ".join(f"{v} {k}" for k, v in counts.items()) or "no result line")
                  + f" (exit code {tests.result['exit_code']}); full output in `gpu-tests.txt`."]

    par = by_name.get("parity")
    if par is not None and par.result is not None:
        lines += ["", "## Half-precision parity", "", parity_table(par.result).rstrip()]

    for part in BENCH_PARTS:
        rec = by_name.get(part)
        if rec is None or rec.result is None:
            continue
        res = rec.result
        lines += ["", f"## Benchmark `{part}`", ""]
        rounds = res["meta"].get("rounds", {})
        if rounds and rounds.get("timed", res["meta"]["config"]["repeats"]) < res["meta"]["config"]["repeats"]:
            lines += [f"Stopped by the time budget after {rounds['timed']} of {res['meta']['config']['repeats']} timed rounds.", ""]
        lines.append(markdown_table(res).rstrip())
        if part == "sdxl" and res["meta"]["config"]["device"].startswith("cuda"):
            lines += ["", "| variant | peak allocated | < 40 GB | <= 24 GB |", "|---|---:|---|---|"]
            for name, v in res["variants"].items():
                gb = _mem_gb(v)
                lines.append(f"| {name} | {gb:.2f} GB | {'yes' if gb < 40 else 'no'} | {'yes' if gb <= 24 else 'no'} |")
            lines += ["", "(Allocated tensors only: the CUDA context and the caching allocator's slack add roughly 1-2 GB "
                      "on a real card.)"]

    comp = by_name.get("compile")
    if comp is not None and comp.result is not None:
        sd15 = by_name.get("sd15")
        report = compile_report(comp.result, sd15.result if sd15 is not None else None)
        backend = comp.result["meta"]["config"].get("compile_backend", "inductor")
        lines += ["", f"## torch.compile (backend `{backend}`)", "",
                  "| variant | compile s | steady s/image | vs compiled stock | vs eager stock | graphs | graph breaks "
                  "| frames left eager |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, v in report["variants"].items():
            def fmt(x: Any, spec: str = ".3f") -> str:
                return "-" if x is None else format(x, spec)
            lines.append(f"| {name} | {fmt(v['compile_s'], '.1f')} | {fmt(v['steady_sec_per_image'])} | "
                         f"{fmt(v['vs_compiled_stock'])} | {fmt(v['vs_eager_stock'])} | {fmt(v['graphs'], 'd')} | "
                         f"{fmt(v['graph_breaks'], 'd')} | {fmt(v['frames_left_eager'], 'd')} |")
        lines += ["", "Compile s: the first (warm-up) run less the steady median; graphs, graph breaks and frames "
                  "dynamo gave up on (they run eagerly): dynamo's counters over every run of the variant."]
        for name, v in report["variants"].items():
            if v["unsupported"]:
                lines += ["", f"`{name}`: dynamo met " + "; ".join(f"\"{r}\" ({c}x)" for r, c in v["unsupported"].items())]
        if not report["eager_comparable"]:
            lines.append("The eager `sd15` run is missing or used other settings: no comparison with eager stock.")

    targets = _targets(by_name)
    if targets:
        lines += ["", "## Targets", "", "| target | limit | measured | met |", "|---|---|---:|---|"]
        for what, limit, value, met in targets:
            lines.append(f"| {what} | {limit} | {value} | {'yes' if met else '**no**'} |")

    failed = [r for r in records if r.status == "failed" and r.output_tail]
    for r in failed:
        lines += ["", f"## `{r.name}` failed", "", "```", *r.output_tail, "```"]
    lines += ["", "Files: " + ", ".join(f"`{f}`" for f in OUTPUT_FILES if (opts.out / f).exists() or f == "summary.md")]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, records: list[PartRecord], opts: SuiteOptions, t0: float) -> list[Path]:
    """(Re)write every output that the finished parts allow; return the files in ``out``."""
    by_name = {r.name: r for r in records}
    par = by_name.get("parity")
    if par is not None and par.result is not None:
        _dump(out / "parity.json", par.result)
    bench = {p: by_name[p].result for p in BENCH_PARTS if p in by_name and by_name[p].result is not None}
    if bench:
        _dump(out / "bench.json", bench)
        (out / "bench.md").write_text(
            "\n".join(f"## `{p}`\n\n{markdown_table(r)}" for p, r in bench.items()), encoding="utf-8")
        bar_chart(bench.get("sd15") or next(iter(bench.values())), out / "bench.png")
    comp = by_name.get("compile")
    if comp is not None and comp.result is not None:
        sd15 = bench.get("sd15")
        _dump(out / "compile.json", {**comp.result, "compile_report": compile_report(comp.result, sd15)})
    (out / "summary.md").write_text(_summary(records, opts, t0), encoding="utf-8")
    return [out / f for f in OUTPUT_FILES if (out / f).exists()]
