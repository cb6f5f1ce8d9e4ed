"""``attnctl dataset stylize|sample``: build benchmark manifests for ``attnctl eval``."""

from __future__ import annotations

import argparse

from attnctl.cli import Command


def _stylize(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.dataset.manifest import build_stylized_manifest

    path = build_stylized_manifest(args.content, args.styles, args.annotations, args.out, size=args.size, mode=args.mode)
    print(f"wrote {path}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.extras import require

    require("eval", "skimage", what="attnctl dataset sample (scikit-image's bundled images)")
    from harmonpaint_recipe.dataset.sample import build_sample

    path = build_sample(args.out, size=args.size, mode=args.mode, limit=args.limit)
    print(f"wrote {path}")
    return 0


def _stylize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--content", required=True, help="folder of content images")
    parser.add_argument("--styles", required=True,
                        help="folder of style images (used round robin unless a record names one)")
    parser.add_argument("--annotations", required=True,
                        help="JSON/JSONL records: image, caption, mask PNG or COCO segmentation")
    parser.add_argument("--out", required=True, help="new output folder")
    parser.add_argument("--size", type=int, default=512, help="center-crop and resize to SIZE x SIZE (0: keep) [512]")
    parser.add_argument("--mode", choices=("stats", "histogram"), default="stats", help="color transfer [stats]")


def _sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", type=int, default=512, help="image size [512]")
    parser.add_argument("--mode", choices=("stats", "histogram"), default="stats", help="color transfer [stats]")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items")


COMMAND = Command(
    help="build Stylized-COCO-like benchmark manifests",
    actions={
        "stylize": Command(help="stylize your images and write items.jsonl with masks and captions",
                           add_arguments=_stylize_arguments, run=_stylize),
        "sample": Command(help="a ready offline sample from scikit-image's bundled images",
                          add_arguments=_sample_arguments, run=_sample),
    },
)
