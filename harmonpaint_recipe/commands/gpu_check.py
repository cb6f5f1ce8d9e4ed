"""``attnctl gpu-check OUT_DIR``: tests, half-precision parity, benchmarks and torch.compile
on a GPU, in one run that fits a time budget (see ``harmonpaint_recipe.bench.gpu_check``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnctl.cli import Command


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


def _gpu_check(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.extras import require

    require("bench", "psutil", "matplotlib", what="attnctl gpu-check (memory sampling, the PNG chart)")
    from harmonpaint_recipe.bench.gpu_check import run_suite
    from harmonpaint_recipe.bench.gpu_plan import SuiteOptions

    opts = SuiteOptions(
        out=Path(args.out_dir), arch=args.arch, sdxl_arch=args.sdxl_arch, sd2_arch=args.sd2_arch,
        device=args.device, dtype=args.dtype, size=args.size, steps=args.steps, repeats=args.repeats,
        warmup=args.warmup, parity_steps=args.parity_steps, budget=args.budget, skip=_names(args.skip),
        only=_names(args.only), tests=args.tests, in_process=args.in_process, t0=args.t0,
        compile_backend=args.compile_backend,
    )
    records = run_suite(opts)
    bad = [r.name for r in records if r.status in ("failed", "timed out")]
    print(f"wrote {opts.out}/summary.md" + (f"; not ok: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    from harmonpaint_recipe.bench.archs import ARCHITECTURES
    from harmonpaint_recipe.bench.gpu_plan import DEFAULT_BUDGET_S, PART_NAMES

    parser.add_argument("out_dir", metavar="OUT_DIR", help="output folder (created)")
    parser.add_argument("--arch", default="sd15-inpaint", choices=list(ARCHITECTURES),
                        help="architecture of tests/parity/sd15/compile [sd15-inpaint]")
    parser.add_argument("--sdxl-arch", default=None, choices=list(ARCHITECTURES),
                        help="architecture of the sdxl part [sdxl-inpaint; tiny-sdxl when --arch is not full-size]")
    parser.add_argument("--sd2-arch", default=None, choices=list(ARCHITECTURES),
                        help="architecture of the sd2 part [sd2-inpaint at 768; --arch when that is not full-size]")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N [auto]")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                        help="benchmark dtype [auto: fp16 on CUDA, fp32 on CPU]")
    parser.add_argument("--size", type=int, default=None, help="image side of every benchmark and parity run [each arch's]")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps of every benchmark [sd15/compile 50, sdxl/sd2 20]")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds of every benchmark [sd15/sdxl 5, compile/sd2 3]")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds of every benchmark [1; 2 for compile, compile-hp]")
    parser.add_argument("--parity-steps", type=int, default=10, help="DDIM steps of the parity runs [10]")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds the whole run may take, counted from --t0 [{DEFAULT_BUDGET_S:.0f}]")
    parser.add_argument("--t0", type=float, default=None,
                        help="start of the budget as a Unix time (scripts/gpu-check.sh passes its own start) [now]")
    parser.add_argument("--skip", default=None, help=f"comma list of parts not to run ({', '.join(PART_NAMES)})")
    parser.add_argument("--only", default=None, help="comma list of the parts to run [all]")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compile part; 'eager' only traces (graph breaks "
                        "without code generation: a quick CPU dry run) [inductor]")
    parser.add_argument("--tests", default="tests/test_gpu.py", help="the GPU test file [tests/test_gpu.py]")
    parser.add_argument("--in-process", action="store_true",
                        help="run the measuring parts in this process (no per-part time limit; for quick CPU checks)")


COMMAND = Command(
    help="GPU tests, fp16/bf16 parity, benchmarks and torch.compile in one timed run",
    description="Run the parts tests, parity, sd15, sdxl, compile, sd2 (in that order, each in its own "
    "process) on random-weight full-size models and write summary.md, suite.log, gpu-tests.txt, "
    "parity.json, bench.json, bench.md, bench.png and compile.json into OUT_DIR. Parts that would not "
    "fit the time budget are skipped; summary.md says which. On CPU, try --arch tiny.",
    add_arguments=_arguments,
    run=_gpu_check,
)
