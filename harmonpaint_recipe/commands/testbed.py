"""``attnctl testbed``: the offline testbed world and its small trained inpainting model.

    attnctl testbed render OUT_DIR [--count 8]          world samples: images, masks, captions
    attnctl testbed train OUT_DIR [--minutes 110]       train judges, VAE, UNet into a pipeline folder
    attnctl testbed judges OUT_DIR                      fit the judges OUT_DIR/judges lacks (fidelity, harmony)
    attnctl testbed eval --out DIR [--items 100]        Table III on held-out scenes, with CIs and controls
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

from attnctl.cli import Command
from attnctl.errors import InputError


def _threads(n: int) -> None:
    import torch

    if n < 1:
        raise InputError(f"--threads must be at least 1, got {n}")
    torch.set_num_threads(n)


def _train(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.testbed.settings import TrainSettings
    from harmonpaint_recipe.testbed.train import train_testbed

    _threads(args.threads)
    settings = TrainSettings(out_dir=Path(args.out_dir), seed=args.seed, device=args.device,
                             cache_scenes=args.cache_scenes, half_unet=not args.fp32,
                             init_from=Path(args.init_from) if args.init_from else None)
    if args.unet_lr is not None:
        settings.unet_lr = args.unet_lr
    settings.snr_gamma = args.snr_gamma
    if args.minutes is not None:
        if args.minutes < 10:
            raise InputError(f"--minutes {args.minutes}: the stages need at least 10 minutes in all")
        # the default stages' shares (10 + 25 + 25 + 80 min of 157); the remaining ~11% goes
        # to rendering the judge scenes, calibrating, encoding the UNet's scenes and saving
        settings.judge_minutes = 0.064 * args.minutes
        settings.harmony_minutes = 0.16 * args.minutes
        settings.vae_minutes = 0.16 * args.minutes
        settings.unet_minutes = 0.51 * args.minutes
    for name in ("judge_steps", "harmony_steps", "vae_steps", "unet_steps", "unet_minutes"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    train_testbed(settings)
    print(f"wrote {args.out_dir}; use it with model.pretrained={args.out_dir} or `attnctl testbed eval --model {args.out_dir}`")
    return 0


def _judges(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.testbed.settings import TrainSettings
    from harmonpaint_recipe.testbed.train import apply_umask
    from harmonpaint_recipe.testbed.train_judges import stage_judges

    _threads(args.threads)
    settings = TrainSettings(out_dir=Path(args.out_dir), seed=args.seed)
    for name in ("judge_steps", "harmony_steps", "harmony_minutes"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    settings.check()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    stage_judges(settings)
    apply_umask(Path(args.out_dir) / "judges")
    print(f"wrote {Path(args.out_dir) / 'judges'}; `attnctl testbed eval --model {args.out_dir}` scores with them "
          "when the folder also holds a pipeline")
    return 0


def _render(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.testbed.samples import write_samples

    records = write_samples(Path(args.out_dir), count=args.count, start=args.start, split=args.split,
                            mask_kind=args.mask_kind)
    print(f"wrote {len(records)} scene(s) to {args.out_dir}: inpaint.jsonl for `attnctl inpaint --manifest`, "
          "items.jsonl (with each scene's style, shape and colour) for `attnctl eval`")
    if args.grid:
        from harmonpaint_recipe.files import atomic_save_image
        from harmonpaint_recipe.testbed.samples import world_grid

        atomic_save_image(args.grid, world_grid(count=args.count, start=args.start, split=args.split))
        print(f"wrote {args.grid}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.testbed.evaluate import EvalSettings, run_testbed_eval

    _threads(args.threads)
    settings = EvalSettings(
        out=Path(args.out), items=args.items, start=args.start, mask_kind=args.mask_kind, seed=args.seed,
        model=args.model, lambdas=tuple(args.lambdas), steps=args.steps, bootstrap=args.bootstrap,
    )
    report = run_testbed_eval(settings)
    if report is not None:  # the main process of a sharded run writes the report
        print(report.read_text(encoding="utf-8"))
    return 0


def _comparison(module: str, settings_class: str, run: str) -> Callable[[argparse.Namespace], int]:
    """The action of a judged comparison (``harmonpaint_recipe.testbed.<module>``)."""

    def action(args: argparse.Namespace) -> int:
        from importlib import import_module

        found = import_module(f"harmonpaint_recipe.testbed.{module}")
        _threads(args.threads)
        settings = getattr(found, settings_class)(out=Path(args.out), items=args.items, start=args.start,
                                                  mask_kind=args.mask_kind, steps=args.steps, seed=args.seed,
                                                  bootstrap=args.bootstrap)
        print(getattr(found, run)(settings).read_text(encoding="utf-8"))
        return 0

    return action


def _removal_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (<action>.md, .json, .png)")
    parser.add_argument("--items", type=int, default=40, help="held-out scenes [40]")
    parser.add_argument("--start", type=int, default=0, help="first held-out scene number [0]")
    parser.add_argument("--mask-kind", choices=("box", "shape"), default="shape", help="mask type [shape]")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps [the recipes': 50]")
    parser.add_argument("--seed", type=int, default=0, help="added to each scene's number as its noise seed [0]")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs [2000]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads [1]")


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.8,1.4,2.0; got '{text}'") from None


def _render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="output folder (created)")
    parser.add_argument("--count", type=int, default=8, help="number of scenes [8]")
    parser.add_argument("--start", type=int, default=0, help="first scene number [0]")
    parser.add_argument("--split", default="demo", help="scene stream: train, eval, judge, calibrate, demo [demo]")
    parser.add_argument("--mask-kind", choices=("box", "shape"), default=None, help="mask type [drawn per scene]")
    parser.add_argument("--grid", default=None, help="also write a picture of the scenes (styled, flat, mask) to this PNG")


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="output folder; a finished stage found there is skipped")
    parser.add_argument("--minutes", type=float, default=None,
                        help="total wall-time budget, split over the stages [stage defaults: 10 + 25 + 25 + 80 min, ~155 min in all]")
    parser.add_argument("--judge-steps", type=int, default=None, help="fidelity judge step limit [3000]")
    parser.add_argument("--harmony-steps", type=int, default=None, help="harmony judge step limit [5000]")
    parser.add_argument("--vae-steps", type=int, default=None, help="VAE step limit [6000]")
    parser.add_argument("--unet-steps", type=int, default=None, help="UNet step limit [8000]")
    parser.add_argument("--unet-minutes", type=float, default=None,
                        help="UNet stage time budget in minutes (after --minutes' split) [80]")
    parser.add_argument("--cache-scenes", type=int, default=12000, help="scenes encoded for UNet training [12000]")
    parser.add_argument("--unet-lr", type=float, default=None, help="peak learning rate of the UNet stage [5e-4]")
    parser.add_argument("--snr-gamma", type=float, default=None,
                        help="weight the UNet loss by min(SNR, GAMMA)/SNR (more weight on noisy steps) [off]")
    parser.add_argument("--init-from", default=None,
                        help="continue training the UNet and text encoder of this earlier OUT_DIR (its VAE and judges are reused)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda [cpu]")
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1) - 1),
                        help="torch CPU threads [1 on a 2-core machine]")
    parser.add_argument("--seed", type=int, default=0, help="weights and data order seed [0]")
    parser.add_argument("--fp32", action="store_true", help="store the UNet in fp32 (default fp16, half the size)")


def _judges_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", help="folder whose judges/ subfolder gets the judges; a judge found there is kept")
    parser.add_argument("--judge-steps", type=int, default=None, help="fidelity judge step limit [3000]")
    parser.add_argument("--harmony-steps", type=int, default=None, help="harmony judge step limit [5000]")
    parser.add_argument("--harmony-minutes", type=float, default=None, help="harmony judge time budget [25]")
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="torch CPU threads [2 on a 2-core machine]")
    parser.add_argument("--seed", type=int, default=0, help="weights and data order seed [0]")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (resumable)")
    parser.add_argument("--items", type=int, default=100, help="held-out scenes [100]")
    parser.add_argument("--start", type=int, default=0, help="first held-out scene number [0]")
    parser.add_argument("--mask-kind", choices=("box", "shape"), default="box", help="mask type [box]")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of every item and method [0]")
    parser.add_argument("--model", default="testbed", help="'testbed' (shipped) or a folder from `testbed train` [testbed]")
    parser.add_argument("--lambdas", type=_float_list, default=[0.8, 3.0],
                        help="extra MAKVS lambda values for the sweep (1.4 is the full recipe) [0.8,3.0]")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps [the recipe's: 50]")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs [2000]")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads [1]")


COMMAND = Command(
    help="offline testbed: a toy world, a small trained inpainting model, Table III on it",
    description="A procedural world of objects on stylized backgrounds, a small SD-inpainting-shaped model "
    "trained on it (shipped; `model.pretrained=testbed`), and judges that score fidelity and harmony.",
    actions={
        "render": Command(help="write world scenes: image, mask, flat and styled renderings, captions",
                          add_arguments=_render_arguments, run=_render),
        "train": Command(help="train the judges, the VAE and the UNet + text encoder into a pipeline folder",
                         add_arguments=_train_arguments, run=_train),
        "judges": Command(help="fit the fidelity and harmony judges (on ground truth only) into OUT_DIR/judges",
                          add_arguments=_judges_arguments, run=_judges),
        "eval": Command(help="Table III (SDI, +SAMS, +SAMS+L_s, full, step readings, paste-back, lambda sweep, "
                        "controls) on held-out scenes",
                        add_arguments=_eval_arguments, run=_eval),
        "removal": Command(help="object removal: Attentive Eraser and stock inpainting with empty prompts, judged "
                           "(no object seen, harmony, background error) with controls",
                           add_arguments=_removal_arguments,
                           run=_comparison("removal", "RemovalSettings", "run_removal_eval")),
        "objects": Command(help="object prompts: HD-Painter (and PAIntA, RASG alone) against stock inpainting, "
                           "judged (the prompt's object seen, harmony, background error) with controls",
                           add_arguments=_removal_arguments,
                           run=_comparison("objects", "ObjectsSettings", "run_objects_eval")),
    },
)
