"""``attnctl inpaint``: one image, a manifest of images, or a reproduction from a sidecar.

    attnctl inpaint --recipe harmonpaint --image in.png --mask m.png --prompt "a cat" --out out.png
    attnctl inpaint --recipe harmonpaint --manifest items.jsonl --out-dir results/ [--compare sdi]
    attnctl inpaint --from out.json [--out again.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnctl.cli import Command
from attnctl.errors import ConfigError, InputError
from harmonpaint_recipe.commands.run_options import add_run_inputs, run_overrides
from harmonpaint_recipe.progress import step_bar_config


def _single(args: argparse.Namespace, overrides: list[str]) -> int:
    from harmonpaint_recipe.jobs import Job, JobRunner
    from harmonpaint_recipe.loading import load_recipe

    # an empty prompt, given as --prompt "", is a prompt (object removal runs with one)
    missing = [f"--{k}" for k in ("image", "mask", "prompt", "out")
               if getattr(args, k) is None or (k != "prompt" and getattr(args, k) == "")]
    if missing:
        raise InputError(
            f"missing {', '.join(missing)}; give --image, --mask, --prompt and --out "
            "(or --manifest and --out-dir, or --from SIDECAR.json)"
        )
    recipe = load_recipe(args.recipe, overrides)
    job = Job(Path(args.image), Path(args.mask), args.prompt, Path(args.out), args.seed)
    jobs = JobRunner(recipe, args.recipe, overrides, resize_mask=args.resize_mask, threads=args.threads)
    inputs = jobs.prepare(job)
    try:
        jobs.set_progress_bar(**step_bar_config(own_bar=False))
        record = jobs.run(job, inputs)
    finally:
        jobs.close()
    print(f"wrote {job.out} (seed {record['seed']}) and {job.out.with_suffix('.json')}")
    return 0


def _reproduce(args: argparse.Namespace, overrides: list[str]) -> int:
    from harmonpaint_recipe.jobs import JobRunner, reproduction
    from harmonpaint_recipe.sidecar import read_sidecar

    if args.image or args.mask or args.manifest:
        raise InputError("--from reproduces the sidecar's own inputs; drop --image/--mask/--manifest")
    sidecar_file = Path(args.from_)
    record = read_sidecar(sidecar_file)
    recipe, job, resize = reproduction(record, sidecar_file, Path(args.out) if args.out else None, overrides)
    if args.seed is not None:
        job.seed = args.seed
    if args.prompt:
        job.prompt = args.prompt
    threads = args.threads if args.threads not in (None, "auto") else record.get("threads", args.threads)
    jobs = JobRunner(recipe, record.get("recipe_name", str(sidecar_file)), list(record.get("overrides", [])) + overrides,
                     resize_mask=resize or args.resize_mask, threads=threads)
    try:
        jobs.set_progress_bar(**step_bar_config(own_bar=False))
        new = jobs.run(job)
    finally:
        jobs.close()
    same = new["output"]["sha256"] == record.get("output", {}).get("sha256")
    print(f"wrote {job.out}: {'identical to' if same else 'differs from'} the image recorded in {sidecar_file}")
    return 0


def _manifest(args: argparse.Namespace, overrides: list[str]) -> int:
    from harmonpaint_recipe.batch import read_manifest
    from harmonpaint_recipe.jobs import JobRunner
    from harmonpaint_recipe.loading import load_recipe
    from harmonpaint_recipe.progress import progress
    from harmonpaint_recipe.sidecar import sidecar_path

    if not args.out_dir:
        raise InputError("--manifest needs --out-dir DIR (the folder the images and sidecars go to)")
    if args.image or args.mask or args.out:
        raise InputError("--manifest takes images, masks and prompts from the file; drop --image/--mask/--out")
    recipe = load_recipe(args.recipe, overrides)
    other = None
    if args.compare:
        try:
            other = JobRunner(load_recipe(args.compare, overrides), args.compare, overrides,
                              resize_mask=args.resize_mask, threads=args.threads)
        except ConfigError as exc:
            raise ConfigError(f"--compare {args.compare}: {exc}") from None
    jobs_list = read_manifest(args.manifest, args.out_dir, seed=args.seed)
    todo = [j for j in jobs_list if not (j.out.is_file() and sidecar_path(j.out).is_file())]
    skipped = len(jobs_list) - len(todo)
    if skipped:
        print(f"skipping {skipped} item(s) already written in {args.out_dir}", file=sys.stderr)
    runner = JobRunner(recipe, args.recipe, overrides, resize_mask=args.resize_mask, threads=args.threads)
    prepared = [(job, runner.prepare(job)) for job in todo]  # fail early, before any model work
    if not prepared and other is None:
        print(f"nothing to do: all {len(jobs_list)} item(s) exist in {args.out_dir}")
        return 0
    try:
        if prepared:
            runner.set_progress_bar(**step_bar_config(own_bar=True))  # one bar: per image, not per step
        for job, inputs in progress(prepared, desc="inpaint", unit="image"):
            runner.run(job, inputs)
    finally:
        runner.close()
    print(f"wrote {len(prepared)} image(s) to {args.out_dir}")
    if other is not None:
        _compare(jobs_list, runner, other, Path(args.out_dir))
    return 0


def _compare(jobs: list, runner, other, out_dir: Path) -> None:
    from harmonpaint_recipe.compare_batch import recipe_label, run_compare
    from harmonpaint_recipe.progress import progress

    try:
        other.set_progress_bar(**step_bar_config(own_bar=True))
        summary = run_compare(jobs, runner, other, out_dir, progress=progress)
    finally:
        other.close()
    means = summary["mean_background_mae"]
    main_name, label = runner.recipe_name, recipe_label(other.recipe_name)
    ratio = f" (ratio {summary['ratio']:.2f})" if summary["ratio"] is not None else ""
    print(f"wrote {out_dir / 'compare.png'}: input | {label} | {main_name}, same seeds; change outside the mask "
          f"(mean absolute error vs the input, 0-255): {label} {means[label]:.1f}, {main_name} {means[main_name]:.1f}{ratio}")


def _run(args: argparse.Namespace) -> int:
    overrides = run_overrides(args)
    if args.from_:
        return _reproduce(args, overrides)
    if args.manifest:
        return _manifest(args, overrides)
    return _single(args, overrides)


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_run_inputs(parser)
    parser.add_argument("--out", help="output image path (.png/.jpg/.webp); its folder is created")
    parser.add_argument("--manifest", help="JSONL with image, mask, prompt[, seed, name] per line (batch mode)")
    parser.add_argument("--out-dir", help="output folder of batch mode; items already written are skipped")
    parser.add_argument("--compare", metavar="RECIPE",
                        help="batch mode: also run RECIPE on the same items and seeds (into OUT_DIR/compare-RECIPE) "
                        "and write OUT_DIR/compare.png side by side")
    parser.add_argument("--from", dest="from_", metavar="SIDECAR", help="reproduce the image a sidecar JSON describes")


COMMAND = Command(
    help="inpaint images with a recipe (writes image + sidecar JSON)",
    description="Inpaint the white region of a mask. Every output gets a sidecar JSON next to it from which "
    "`attnctl inpaint --from OUT.json` remakes the same image.",
    add_arguments=_arguments,
    run=_run,
)
