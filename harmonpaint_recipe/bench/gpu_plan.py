"""The GPU check's plan: what was asked (``SuiteOptions``), the parts it runs (``Part``,
``plan_parts``), their deadlines, and what happened to each (``PartRecord``).

Kept apart from ``gpu_check`` (which runs the parts) so the summary writer can name these
types without importing the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnctl.errors import ConfigError, did_you_mean

DEFAULT_BUDGET_S = 480.0
#: kept free at the end for writing the outputs
FINAL_RESERVE_S = 10.0


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
