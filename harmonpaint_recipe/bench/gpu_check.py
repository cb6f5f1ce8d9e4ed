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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from attnctl.errors import ConfigError, did_you_mean

DEFAULT_BUDGET_S = 480.0
#: kept free at the end for writing the outputs
FINAL_RESERVE_S = 10.0
#: a benchmark part stops starting rounds this long before its deadline (result writing, exit)
EXIT_MARGIN_S = 5.0
LOG_CAP_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Part:
    """One step of the suite.

    Attributes:
        name: CLI name (``--skip`` / ``--only``).
        title: one line for the summary.
        kind: ``pytest``, ``parity`` or ``bench`` (see ``gpu_parts``).
        settings: the part's settings (``ParityConfig`` / ``BenchConfig`` fields; ``pytest``:
            the test file).
        estimate_s: expected wall time on an H200 at the default settings.
        min_s: the least time worth starting it with (reserved while earlier parts run).
        optional: run only with time to spare (nothing is reserved for it).
    """

    name: str
    title: str
    kind: str
    settings: dict[str, Any]
    estimate_s: float
    min_s: float
    optional: bool = False


PART_NAMES: tuple[str, ...] = ("tests", "parity", "sd15", "sdxl", "compile", "compile-hp", "sd2")
_ALL_VARIANTS = ["stock", "idle", "sams+makvs", "harmonpaint", "naive"]


@dataclass
class SuiteOptions:
    """What ``attnctl gpu-check`` was asked to do (see its ``--help``)."""

    out: Path
    arch: str = "sd15-inpaint"
    sdxl_arch: str | None = None
    sd2_arch: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    size: int | None = None
    steps: int | None = None
    repeats: int | None = None
    warmup: int | None = None
    parity_steps: int = 10
    budget: float = DEFAULT_BUDGET_S
    skip: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    tests: str = "tests/test_gpu.py"
    in_process: bool = False
    t0: float | None = None
    seed: int = 0
    compile_backend: str = "inductor"

    def check(self) -> None:
        """Raise ``ConfigError`` naming the bad option."""
        from harmonpaint_recipe.bench.archs import ARCHITECTURES

        for name in (self.arch, self.sdxl_arch, self.sd2_arch):
            if name is not None:
                ARCHITECTURES.get(name, "--arch")
        for flag, names in (("--skip", self.skip), ("--only", self.only)):
            for n in names:
                if n not in PART_NAMES:
                    raise ConfigError(f"{flag}: unknown part '{n}'{did_you_mean(n, PART_NAMES)}; "
                                      f"parts: {', '.join(PART_NAMES)}")
        if self.budget <= FINAL_RESERVE_S:
            raise ConfigError(f"--budget must be more than {FINAL_RESERVE_S:.0f} seconds, got {self.budget:g}")
        for flag, value, least in (("--steps", self.steps, 1), ("--repeats", self.repeats, 1),
                                   ("--warmup", self.warmup, 0), ("--parity-steps", self.parity_steps, 1)):
            if value is not None and value < least:
                raise ConfigError(f"{flag} must be at least {least}, got {value}")
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise ConfigError(f"--size must be a positive multiple of 8 (VAE factor), got {self.size}")


def plan_parts(opts: SuiteOptions) -> list[Part]:
    """The parts to run, in order, with their settings (the skipped ones left out)."""
    from harmonpaint_recipe.bench.archs import ARCHITECTURES

    full = ARCHITECTURES.get(opts.arch, "--arch").full_size
    sdxl_arch = opts.sdxl_arch or ("sdxl-inpaint" if full else "tiny-sdxl")
    sd2_arch = opts.sd2_arch or ("sd2-inpaint" if full else opts.arch)
    sd2_size = 768 if ARCHITECTURES.get(sd2_arch, "--arch").full_size else None

    def bench(arch: str, steps: int, repeats: int, variants: list[str], size: int | None = None,
              compile: bool = False) -> dict[str, Any]:
        # compiled: the first timed round after one warm-up round still recompiles (each swap
        # of variants changes the processors dynamo guards on), so two warm-up rounds
        warmup = (2 if compile else 1) if opts.warmup is None else opts.warmup
        return dict(arch=arch, size=opts.size or size, steps=opts.steps or steps,
                    repeats=opts.repeats or repeats, warmup=warmup,
                    dtype=opts.dtype, device=opts.device, variants=variants, compile=compile, seed=opts.seed,
                    compile_backend=opts.compile_backend)

    parts = [
        Part("tests", "GPU-marked tests (tests/test_gpu.py)", "pytest", {"path": opts.tests}, 30, 20),
        Part("parity", "fp16 / bf16 vs fp32 final latents, 4 recipes", "parity",
             dict(arch=opts.arch, size=opts.size, steps=opts.parity_steps, device=opts.device, seed=opts.seed), 50, 30),
        Part("sd15", "benchmark, SD1.5 layout: stock, idle, sams+makvs, harmonpaint, naive", "bench",
             bench(opts.arch, 50, 5, _ALL_VARIANTS), 110, 60),
        Part("sdxl", "benchmark, SDXL: stock vs harmonpaint (peak memory)", "bench",
             bench(sdxl_arch, 20, 5, ["stock", "harmonpaint"]), 75, 45),
        Part("compile", "benchmark with torch.compile: stock, idle, sams+makvs", "bench",
             bench(opts.arch, 50, 3, _ALL_VARIANTS[:3], compile=True), 150, 90),
        Part("compile-hp", "benchmark with torch.compile: stock, harmonpaint (if time is left)", "bench",
             bench(opts.arch, 50, 3, ["stock", "harmonpaint"], compile=True), 150, 100, optional=True),
        Part("sd2", "benchmark, SD2 at 768: stock, idle, sams+makvs, harmonpaint (if time is left)", "bench",
             bench(sd2_arch, 20, 3, _ALL_VARIANTS[:4], size=sd2_size), 70, 45, optional=True),
    ]
    chosen = set(opts.only or PART_NAMES) - set(opts.skip)
    return [p for p in parts if p.name in chosen]


def part_deadline(end: float, later: list[Part]) -> float:
    """When a part must be done: the suite's end less the minimum time of every later
    part that is not optional."""
    return end - sum(p.min_s for p in later if not p.optional)


@dataclass
class PartRecord:
    """What happened to one part (``result`` is the part's record when it finished)."""

    name: str
    title: str
    status: str = "pending"  # ok | failed | timed out | skipped
    reason: str | None = None
    wall_s: float | None = None
    estimate_s: float | None = None
    exit_code: int | None = None
    result: dict[str, Any] | None = None
    output_tail: list[str] = field(default_factory=list)


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
