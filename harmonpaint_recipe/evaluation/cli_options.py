"""Command-line options shared by ``attnctl eval`` and ``attnctl ablate``."""

from __future__ import annotations

import argparse
from pathlib import Path

from typing import TYPE_CHECKING

from attnctl.errors import InputError
from harmonpaint_recipe.metrics.defaults import DEFAULT_CLIP_MODEL, DEFAULT_CMMD_MODEL, DEFAULT_IR_MODEL, DEFAULT_METRICS

if TYPE_CHECKING:
    from harmonpaint_recipe.evaluation.methods import Method


def add_common_options(p: argparse.ArgumentParser) -> None:
    """Data, output, metric and metric-model options."""
    p.add_argument("--data", required=True, help="items.jsonl (id, image, mask, prompt per line)")
    p.add_argument("--out", required=True, help="output folder; rerunning into it resumes")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS), help="comma list of cs,cmmd,as,ir,preserve [all]")
    p.add_argument("--mask-key", default="mask", help="item key of the mask to use, e.g. bbox_mask [mask]")
    p.add_argument("--seed", type=int, default=0, help="seed of items without their own [0]")
    p.add_argument("--reference-dir", type=Path, help="CMMD reference images (default: the items' source images)")
    g = p.add_argument_group("metric models")
    g.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help=f"CLIP for CS and AS [{DEFAULT_CLIP_MODEL}]")
    g.add_argument("--cmmd-model", default=DEFAULT_CMMD_MODEL, help=f"CLIP for CMMD [{DEFAULT_CMMD_MODEL}]")
    g.add_argument("--aesthetic-head", help="LAION improved aesthetic predictor head (.safetensors)")
    g.add_argument("--ir-model", default=DEFAULT_IR_MODEL, help=f"ImageReward checkpoint [{DEFAULT_IR_MODEL}]")
    g.add_argument("--preserve-mode", choices=("standard", "brushbench"), default="standard", help="[standard]")
    g.add_argument("--lpips", action="store_true",
                   help="also LPIPS on the unmasked region (torchmetrics; needs torchvision and downloaded weights)")
    g.add_argument("--local-files-only", action="store_true", help="never download metric models")
    p.add_argument("--threads", default="auto",
                   help="CPU threads [auto: OMP_NUM_THREADS if set, 1 for the tiny models, else torch's default]")
    g.add_argument("--device", default="auto", help="device of the metric models [auto: the process's accelerator or cpu]")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides applied to every method")


def check_overrides(overrides: list[str]) -> list[str]:
    """Overrides must look like ``key=value``."""
    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise InputError(f"override '{o}' is not KEY=VALUE (e.g. sampler.num_inference_steps=20)")
    return list(overrides)


def run_from_args(args: argparse.Namespace, methods: list[Method], title: str) -> int:
    """Build the config from parsed options, run, and print where the results are."""
    from harmonpaint_recipe.extras import require

    if args.lpips:
        require("eval", "torchmetrics", "torchvision", what="--lpips (torchmetrics' LPIPS network)")
    from harmonpaint_recipe.evaluation.items import load_items
    from harmonpaint_recipe.evaluation.runner import EvalConfig, run_evaluation
    from harmonpaint_recipe.evaluation.sharding import current_shard
    from harmonpaint_recipe.metrics import MetricOptions, parse_metric_names

    from harmonpaint_recipe.devices import configure_threads
    from harmonpaint_recipe.loading import load_recipe

    first = next((m for m in methods if m.recipe), None)
    if first is not None:  # the thread count suits the model the recipes run
        configure_threads(args.threads, str(load_recipe(first.recipe, list(first.overrides)).model.pretrained))
    shard = current_shard()
    device = shard.device if args.device == "auto" else args.device
    options = MetricOptions(
        clip_model=args.clip_model, cmmd_model=args.cmmd_model, aesthetic_head=args.aesthetic_head,
        ir_model=args.ir_model, preserve_mode=args.preserve_mode, lpips=args.lpips,
        local_files_only=args.local_files_only, device=device,
    )
    config = EvalConfig(
        items=load_items(args.data, args.mask_key), methods=methods, out=Path(args.out),
        metric_names=parse_metric_names(args.metrics), metric_options=options, seed=args.seed,
        reference_dir=args.reference_dir, title=title,
    )
    result = run_evaluation(config, shard=shard)
    if shard.is_main:
        print(result.summary_md.read_text(encoding="utf-8"))
        print(f"per-item: {result.per_item}\nsummary: {result.summary_csv}\ngrids: {', '.join(map(str, result.grids))}")
    return 0
