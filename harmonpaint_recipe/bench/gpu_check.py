"""``attnctl gpu-check OUT_DIR``: the GPU numbers in one run that fits a time budget.

Parts, in the order they run (each skippable with ``--skip``, or picked with ``--only``):

=========== ===================================================================== =========
part        what                                                                  H200 est.
=========== ===================================================================== =========
tests       ``pytest -m gpu tests/test_gpu.py``                                   30 s
parity      fp16 and bf16 vs fp32 final latents, 4 recipes, 512², 10 steps        50 s
sd15        benchmark: 5 variants, 512², 50 DDIM steps, CFG 7.5, fp16, 5 repeats  110 s
sdxl        benchmark: stock vs harmonpaint, 1024², 20 steps, fp16, 5 repeats     75 s
compile     sd15 with torch.compile: stock, idle, sams+makvs, 3 repeats + 2 warm-up 150 s
compile-hp  the same for stock and harmonpaint (only if time is left)             150 s
sd2         benchmark: 4 variants, SD2 at 768², 20 steps, 3 repeats (if time left) 70 s
=========== ===================================================================== =========

Compiled ``harmonpaint`` is a part of its own, run only with time to spare: its steer
pass ends the UNet forward early by raising from a hook, which dynamo cannot trace, so it
falls back to compiling the blocks one by one (dozens of graphs) and its compile time is
the least predictable of all.

The estimates are for the full-size architectures on an H200 and were not measured (no
GPU was at hand when they were written); ``summary.md`` records each part's real wall
time next to them. The budget (``--budget``, 480 s) counts from ``--t0`` (the shell
script's start). Before a part starts, every later part that is not optional keeps its
minimum time in reserve; a part is skipped when less than its own minimum is left, a
benchmark drops further warm-up rounds and stops adding timed rounds when the next one
would not fit, and a part that overruns is stopped at its deadline. The outputs are rewritten after every part, so what
is done is on disk whatever happens later.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from harmonpaint_recipe.bench.gpu_plan import (
    FINAL_RESERVE_S, PART_NAMES, Part, PartRecord, SuiteOptions, part_deadline, plan_parts,
)

#: a benchmark part stops starting rounds this long before its deadline (result writing, exit)
EXIT_MARGIN_S = 5.0
LOG_CAP_BYTES = 8 * 2**20


class SuiteLog:
    """Lines to stdout and to ``suite.log`` (the file stops growing at ``LOG_CAP_BYTES``)."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = path.open("w", encoding="utf-8")
        self._written = 0
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            print(line, flush=True)
            data = line + "\n"
            if self._written + len(data) <= LOG_CAP_BYTES:
                self._fh.write(data)
                self._fh.flush()
            self._written += len(data)

    def close(self) -> None:
        if self._written > LOG_CAP_BYTES:
            self._fh.write(f"[suite.log cut at {LOG_CAP_BYTES} bytes; {self._written} were printed]\n")
        self._fh.close()


def _run_process(cmd: list[str], timeout: float, on_line: Callable[[str], None]) -> tuple[int | None, list[str]]:
    """Run ``cmd`` in its own process group, pass each output line to ``on_line``; stop the
    whole group at ``timeout`` (exit code ``None`` then). Returns the exit code and the last lines."""
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            del tail[:-40]
            on_line(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code: int | None = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # compile workers and all
        proc.wait()
        code = None
    reader.join(timeout=5)
    return code, tail


_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)")


def pytest_counts(text: str) -> dict[str, int]:
    """``{"passed": 6, "skipped": 1, ...}`` from pytest's closing line (the last line that has counts)."""
    for line in reversed(text.splitlines()):
        found = _PYTEST_COUNT.findall(line)
        if found:
            counts: dict[str, int] = {}
            for number, word in found:
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(number)
            return counts
    return {}


def _run_tests(part: Part, out: Path, timeout: float, log: Callable[[str], None], rec: PartRecord) -> None:
    path = Path(part.settings["path"])
    if not path.is_file():
        rec.status, rec.reason = "skipped", f"{path} not found: run gpu-check from the repository root"
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(path)]
    lines: list[str] = []
    code, _ = _run_process(cmd, timeout, lines.append)
    text = "\n".join(lines) + "\n"
    (out / "gpu-tests.txt").write_text(f"$ python {' '.join(cmd[1:])}\n{text}", encoding="utf-8")
    counts = pytest_counts(text)
    rec.exit_code, rec.result = code, {"command": " ".join(["python", *cmd[1:]]), "exit_code": code, "counts": counts}
    log(f"tests: {', '.join(f'{v} {k}' for k, v in counts.items()) or 'no result line'} (exit code {code})")
    if code is None:
        rec.status, rec.reason = "timed out", f"stopped after {timeout:.0f} s"
    elif code == 0:
        rec.status = "ok"
    else:
        rec.status, rec.reason = "failed", f"pytest exit code {code}"


def _run_measuring(part: Part, timeout: float, deadline: float, in_process: bool,
                   log: Callable[[str], None], rec: PartRecord) -> None:
    settings = dict(part.settings)
    if part.kind == "bench":
        settings["stop_after"] = deadline - EXIT_MARGIN_S
    if in_process:
        from harmonpaint_recipe.bench.gpu_parts import run_part

        try:
            rec.result, rec.status, rec.exit_code = run_part(part.kind, settings, log), "ok", 0
        except Exception as exc:  # a failing part must not stop the others
            rec.status, rec.reason, rec.exit_code = "failed", f"{type(exc).__name__}: {exc}", 1
            log(f"{part.name}: failed: {rec.reason}")
        return
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "harmonpaint_recipe.bench.gpu_parts", part.kind,
               "--settings", json.dumps(settings), "--result", str(result_path)]
        code, tail = _run_process(cmd, timeout, log)
        rec.exit_code, rec.output_tail = code, tail[-15:]
        if code is None:
            rec.status, rec.reason = "timed out", f"stopped at its deadline after {timeout:.0f} s"
        elif code != 0 or not result_path.is_file():
            rec.status = "failed"
            rec.reason = next((ln for ln in reversed(tail) if ln.strip()), f"exit code {code}")
        else:
            rec.status, rec.result = "ok", json.loads(result_path.read_text(encoding="utf-8"))


def run_suite(opts: SuiteOptions) -> list[PartRecord]:
    """Run the planned parts within the budget, rewriting the outputs after each one."""
    from harmonpaint_recipe.bench.gpu_summary import write_outputs

    opts.check()
    t0 = opts.t0 if opts.t0 is not None else time.time()
    end = t0 + opts.budget - FINAL_RESERVE_S
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = plan_parts(opts)
    records = [PartRecord(p.name, p.title, estimate_s=p.estimate_s) for p in parts]
    skipped_by_flag = [n for n in PART_NAMES if n not in {p.name for p in parts}]
    log = SuiteLog(out / "suite.log")
    try:
        log(f"gpu-check: parts {', '.join(p.name for p in parts) or '(none)'}; budget {opts.budget:.0f} s from start "
            f"({time.time() - t0:.0f} s already used)" + (f"; not run: {', '.join(skipped_by_flag)}" if skipped_by_flag else ""))
        for i, (part, rec) in enumerate(zip(parts, records)):
            now = time.time()
            deadline = part_deadline(end, parts[i + 1:])
            if deadline - now < part.min_s:
                rec.status = "skipped"
                rec.reason = f"not enough time: needs at least ~{part.min_s:.0f} s, {max(deadline - now, 0):.0f} s left for it"
                log(f"== {part.name}: skipped ({rec.reason})")
                continue
            log(f"== {part.name}: {part.title}  [{deadline - now:.0f} s available, ~{part.estimate_s:.0f} s expected on an H200]")
            start = time.time()
            if part.kind == "pytest":
                _run_tests(part, out, deadline - now, log, rec)
            else:
                _run_measuring(part, deadline - now, deadline, opts.in_process, log, rec)
            rec.wall_s = round(time.time() - start, 1)
            log(f"== {part.name}: {rec.status} in {rec.wall_s:.0f} s" + (f" ({rec.reason})" if rec.reason else ""))
            write_outputs(out, records, opts, t0)
        log(f"gpu-check: done in {time.time() - t0:.0f} s; outputs in {out}")
    finally:
        log.close()
        write_outputs(out, records, opts, t0)
    return records
