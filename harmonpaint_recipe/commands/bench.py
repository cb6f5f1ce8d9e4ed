"""``attnctl bench``: speed and peak memory side by side against stock diffusers."""

from __future__ import annotations

import argparse

from attnctl.cli import Command


def _predict(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from harmonpaint_recipe.bench.predict import DEFAULT_TARGETS, run_predictions
    from harmonpaint_recipe.bench.archs import ARCHITECTURES
    from harmonpaint_recipe.files import atomic_write_text

    if args.arch is None:
        targets = DEFAULT_TARGETS
    else:
        targets = [(args.arch, args.size or ARCHITECTURES.get(args.arch).default_size)]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype, torch.float16)
    groups = {"all": ["stock", "idle", "sams+makvs", "harmonpaint"], "methods": ["p2p", "masactrl", "style-aligned"]}
    variants = [v for part in args.variants.split(",") for v in groups.get(part.strip(), [part.strip()]) if v]
    result = run_predictions(targets, variants, args.steps or 50, dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join("\n".join(r["table"]) for r in result.values()) + "\n"
    atomic_write_text(out / "predict.md", text)
    atomic_write_text(out / "predict.json", json.dumps(result, indent=2))
    print(text)
    print(f"wrote {out / 'predict.json'}, {out / 'predict.md'}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.predict:
        return _predict(args)
    args.arch = args.arch or "mid"
    args.steps = args.steps or 10
    from harmonpaint_recipe.extras import require

    require("bench", "psutil", "matplotlib", what="attnctl bench (memory sampling, the PNG chart)")
    from harmonpaint_recipe.bench import BenchConfig, run_benchmark, write_reports
    from harmonpaint_recipe.bench.report import markdown_table

    cfg = BenchConfig(
        arch=args.arch, size=args.size, steps=args.steps, dtype=args.dtype, device=args.device,
        repeats=args.repeats, warmup=args.warmup, variants=args.variants.split(","),
        compile=args.compile, compile_backend=args.compile_backend, guidance_scale=args.guidance_scale, seed=args.seed, recipe=args.recipe,
    )
    result = run_benchmark(cfg)
    paths = write_reports(result, args.out)
    print()
    print(markdown_table(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    from harmonpaint_recipe.bench.archs import ARCHITECTURES

    parser.add_argument("--arch", default=None, choices=list(ARCHITECTURES),
                        help="architecture [mid; with --predict: sd15-inpaint 512, sd2-inpaint 768, sdxl-inpaint 1024]")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels [the arch's: 512, 1024 for sdxl, 256 mid, 64 tiny]")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps [10; 50 with --predict]")
    parser.add_argument("--predict", action="store_true",
                        help="predict peak memory and FLOPs at full size on fake tensors (nothing allocated, "
                             "no timing); writes predict.json and predict.md")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"), help="[auto: fp16 on CUDA, fp32 on CPU]")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N [auto]")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds [3]")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first [1]")
    parser.add_argument("--variants", default="all",
                        help="comma list of stock,idle,sams+makvs,harmonpaint,naive, and the opt-in stock-eager (stock with "
                        "the UNet uncompiled under --compile), probe-cross "
                        "(cross-attention map probe) and the methods p2p,masactrl,style-aligned,attend-excite,pag,"
                        "reference-only,hd-painter,vsp,masactrl-real,style-aligned-real ('methods' names them all); "
                        "on the transformer architectures (sd35-medium, flux1-fill-dev, mid-sd35, mid-flux-fill, "
                        "tiny-sd3, tiny-flux-fill) all = stock,idle,sams+makvs,harmonpaint+steer; "
                        "stock is always run [all]")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet's forward (every variant but stock-eager, the uncompiled baseline)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend with --compile; 'eager' only traces (graph counts in minutes) [inductor]")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale [7.5]")
    parser.add_argument("--seed", type=int, default=0, help="weights, inputs and noise seed [0]")
    parser.add_argument("--recipe", default=None, help="HarmonPaint recipe [harmonpaint; harmonpaint-sdxl for sdxl]")
    parser.add_argument("--out", default="bench-out", help="output folder [bench-out]")


COMMAND = Command(
    help="time and peak memory of stock / idle / sams+makvs / harmonpaint / naive on a random-weight model",
    description="Run the variants interleaved (round robin, warm-up first) on one random-weight "
    "pipeline with the same inputs and seed; report seconds per image, it/s and peak memory, "
    "each as a ratio to stock, as bench.json, bench.md and bench.png in --out.",
    add_arguments=_arguments,
    run=_bench,
)
