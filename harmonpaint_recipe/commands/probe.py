"""``attnctl probe``: run a recipe with attention probes on; write pictures, curves and every number.

    attnctl probe --recipe harmonpaint --image in.png --mask m.png --prompt "a cat" --out-dir probe/
    attnctl probe --compare sdi harmonpaint --image in.png --mask m.png --prompt "a cat" --out-dir probe/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnctl.cli import Command
from attnctl.errors import InputError
from harmonpaint_recipe.commands.run_options import add_run_inputs, run_overrides

DEFAULT_PROBES = "cross_maps,curves"


def _check(args: argparse.Namespace) -> list[str]:
    """The recipes to run, after checking the options that need no model."""
    missing = [f"--{k.replace('_', '-')}" for k in ("image", "mask", "prompt", "out_dir") if getattr(args, k) in (None, "")]
    if missing:
        raise InputError(f"missing {', '.join(missing)}; give --image, --mask, --prompt and --out-dir")
    if args.compare and args.recipe:
        raise InputError("--compare A B runs both recipes; drop --recipe (or drop --compare to probe one recipe)")
    return list(args.compare) if args.compare else [args.recipe or "harmonpaint"]


def _run(args: argparse.Namespace) -> int:
    recipes = _check(args)
    overrides = run_overrides(args)
    probes = [p.strip() for p in args.probes.split(",") if p.strip()]
    return _probe(args, recipes, overrides, probes)


def _probe(args: argparse.Namespace, recipes: list[str], overrides: list[str], probes: list[str]) -> int:
    from tqdm.auto import tqdm

    from harmonpaint_recipe.devices import configure_threads
    from harmonpaint_recipe.inputs import prepare_inputs
    from harmonpaint_recipe.model import load_pipeline
    from harmonpaint_recipe.probing.outputs import check_out_dir, write_outputs
    from harmonpaint_recipe.probing.run import load_compared, recipe_label, run_probed
    from harmonpaint_recipe.runner import new_seed

    labels = [recipe_label(r) for r in recipes]
    out_dir = Path(args.out_dir)
    check_out_dir(out_dir, labels, [Path(args.image), Path(args.mask)])
    loaded = load_compared(recipes, overrides, probes)
    configure_threads(args.threads, str(loaded[0].model.pretrained))
    inputs = prepare_inputs(args.image, args.mask, resize_mask=args.resize_mask)
    seed = new_seed() if args.seed is None else int(args.seed)
    pipe = load_pipeline(loaded[0])
    pipe.set_progress_bar_config(disable=True)
    runs = []
    with tqdm(desc="probe", unit="step", file=sys.stderr) as bar:
        def on_step(done: int, total: int) -> None:
            if bar.total is None:
                bar.total = total * len(loaded)
                bar.refresh()
            bar.update(1)

        for recipe, label in zip(loaded, labels):
            bar.set_postfix_str(label)
            runs.append(run_probed(pipe, recipe, inputs, args.prompt, seed, label, on_step=on_step))
    meta = {
        "recipes": recipes,
        "overrides": overrides,
        "probes": probes,
        "seed": seed,
        "prompt": args.prompt,
        "inputs": {"image": str(args.image), "mask": str(args.mask), "notes": list(inputs.notes)},
    }
    written = write_outputs(runs, out_dir, meta)
    print(f"wrote {', '.join(p.name for p in written)} to {out_dir} (seed {seed})")
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_run_inputs(parser, recipe_default=None)
    parser.add_argument("--out-dir", help="output folder for the images, the pictures and probes.json (created)")
    parser.add_argument("--compare", nargs=2, metavar=("RECIPE_A", "RECIPE_B"),
                        help="run two recipes (same inputs, seed and overrides) and put them side by side")
    parser.add_argument("--probes", default=DEFAULT_PROBES,
                        help="probes to switch on, comma-separated: cross_maps (token maps), curves (scalar curves), "
                             "self_pca (self-attention PCA; materializes HW x HW maps at its sites, costs more) "
                             f"[{DEFAULT_PROBES}]")


COMMAND = Command(
    help="run a recipe with attention probes: token maps, self-attention PCA, curves (PNG + JSON)",
    description="Inpaint with probes switched on and write, into --out-dir, the image(s), PNG grids of "
    "cross-attention maps per token (rows = steps) and of self-attention PCA, a PNG plot of the per-step "
    "curves (background share under SAMS, bank share under MAKVS, object-token mass and steer loss) and "
    "probes.json with every number. Probe settings are recipe overrides: probes.cross_maps.steps=all, "
    "probes.self_pca.sites=self/2 (see docs/probes.md). --recipe defaults to harmonpaint.",
    add_arguments=_arguments,
    run=_run,
)
