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
- ``compile.json``: ``{part: record}`` for ``compile`` and ``compile-hp``, plus
  ``compile_report``: per variant the compile time, steady-state time, dynamo's counts and
  the comparison with eager ``stock`` from ``sd15``.
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
    from harmonpaint_recipe.bench.gpu_plan import PartRecord, SuiteOptions

BENCH_PARTS: tuple[str, ...] = ("sd15", "sdxl", "sd2")
COMPILE_PARTS: tuple[str, ...] = ("compile", "compile-hp")
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


def _results(records: dict[str, PartRecord], names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {n: records[n].result for n in names if n in records and records[n].result is not None}


def compile_report(compiled: dict[str, dict[str, Any]], eager: dict[str, Any] | None) -> dict[str, Any]:
    """One row per compiled run (part) and variant: compile time (what the warm-up runs took
    beyond the steady median), steady time, time against the same run's compiled ``stock``
    and, where the eager run used the same settings, against eager ``stock``; dynamo's counts."""
    keys = ("arch", "size", "steps", "dtype", "device", "guidance_scale")
    eager_stock = eager["variants"]["stock"]["sec_per_image"]["median"] if eager is not None else None
    rows: list[dict[str, Any]] = []
    comparable_all = bool(compiled)
    for part, result in compiled.items():
        cfg = result["meta"]["config"]
        comparable = eager is not None and all(eager["meta"]["config"].get(k) == cfg.get(k) for k in keys)
        comparable_all = comparable_all and comparable
        for name, v in result["variants"].items():
            rows.append({"part": part, "variant": name, **_compiled_row(v, eager_stock if comparable else None)})
    backend = next(iter(compiled.values()))["meta"]["config"].get("compile_backend", "inductor") if compiled else None
    return {"eager_stock_sec_per_image": eager_stock, "eager_comparable": comparable_all, "backend": backend,
            "rows": rows}


def _compiled_row(v: dict[str, Any], eager_stock: float | None) -> dict[str, Any]:
    steady = v["sec_per_image"]["median"]
    warm = v.get("warmup_seconds") or []
    dynamo = v.get("dynamo", {})
    return {
        # recompiles can also fall in the later warm-up runs (each variant swap changes the processors)
        "compile_s": round(sum(warm) - len(warm) * steady, 3) if warm else None,
        "warmup_seconds": warm,
        "steady_sec_per_image": steady,
        "vs_compiled_stock": v["time_ratio"],
        "vs_eager_stock": steady / eager_stock if eager_stock else None,
        "graphs": dynamo.get("graphs"),
        "graph_breaks": dynamo.get("graph_breaks"),
        "frames_left_eager": dynamo.get("frames_failed"),
        "unsupported": v.get("dynamo_unsupported", {}),
        "finite_output": v["finite_output"],
    }


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
    compiled = _results(records, COMPILE_PARTS)
    if compiled:
        report = compile_report(compiled, _results(records, ("sd15",)).get("sd15"))
        for v in report["rows"]:
            if v["variant"] == "harmonpaint" and v["vs_eager_stock"] is not None:
                rows.append((f"{v['part']}: compiled harmonpaint time vs eager stock (stretch)", "<= 1.0",
                             f"{v['vs_eager_stock']:.3f}", v["vs_eager_stock"] <= 1.0))
        first = report["rows"][0]["part"] if report["rows"] else None
        for v in report["rows"]:
            if v["graph_breaks"] is not None and (v["variant"] != "stock" or v["part"] == first):  # stock once
                lost = v["graph_breaks"] + (v["frames_left_eager"] or 0)
                rows.append((f"{v['part']}: {v['variant']} graph breaks + frames left eager", "0", str(lost), lost == 0))
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

    compiled = _results(by_name, COMPILE_PARTS)
    if compiled:
        report = compile_report(compiled, _results(by_name, ("sd15",)).get("sd15"))
        lines += ["", f"## torch.compile (backend `{report['backend']}`)", "",
                  "| part | variant | compile s | steady s/image | vs compiled stock | vs eager stock | graphs "
                  "| graph breaks | frames left eager |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]

        def fmt(x: Any, spec: str = ".3f") -> str:
            return "-" if x is None else format(x, spec)

        for v in report["rows"]:
            lines.append(f"| {v['part']} | {v['variant']} | {fmt(v['compile_s'], '.1f')} | {fmt(v['steady_sec_per_image'])} | "
                         f"{fmt(v['vs_compiled_stock'])} | {fmt(v['vs_eager_stock'])} | {fmt(v['graphs'], 'd')} | "
                         f"{fmt(v['graph_breaks'], 'd')} | {fmt(v['frames_left_eager'], 'd')} |")
        lines += ["", "Compile s: what the warm-up runs took beyond the steady median; vs compiled stock: against "
                  "`stock` of the same run (same process, interleaved); graphs, graph breaks and frames dynamo gave up "
                  "on (they run eagerly): dynamo's counters over every run of the variant."]
        for v in report["rows"]:
            if v["unsupported"]:
                lines += ["", f"`{v['part']}` / `{v['variant']}`: dynamo met "
                          + "; ".join(f"\"{r}\" ({c}x)" for r, c in v["unsupported"].items())]
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
    compiled = _results(by_name, COMPILE_PARTS)
    if compiled:
        _dump(out / "compile.json", {**compiled, "compile_report": compile_report(compiled, bench.get("sd15"))})
    (out / "summary.md").write_text(_summary(records, opts, t0), encoding="utf-8")
    return [out / f for f in OUTPUT_FILES if (out / f).exists()]
