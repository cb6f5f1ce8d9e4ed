"""``attnctl dataset stylize|sample``: build benchmark manifests for ``attnctl eval``."""

from __future__ import annotations

import argparse


def _stylize(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.dataset.manifest import build_stylized_manifest

    path = build_stylized_manifest(args.content, args.styles, args.annotations, args.out, size=args.size, mode=args.mode)
    print(f"wrote {path}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from harmonpaint_recipe.dataset.sample import build_sample

    path = build_sample(args.out, size=args.size, mode=args.mode, limit=args.limit)
    print(f"wrote {path}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``dataset`` with its ``stylize`` and ``sample`` sub-commands."""
    parser = subparsers.add_parser("dataset", help="build Stylized-COCO-like benchmark manifests")
    sub = parser.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)

    sty = sub.add_parser("stylize", help="stylize your images and write items.jsonl with masks and captions")
    sty.add_argument("--content", required=True, help="folder of content images")
    sty.add_argument("--styles", required=True, help="folder of style images (used round robin unless a record names one)")
    sty.add_argument("--annotations", required=True, help="JSON/JSONL records: image, caption, mask PNG or COCO segmentation")
    sty.add_argument("--out", required=True, help="new output folder")
    sty.add_argument("--size", type=int, default=512, help="center-crop and resize to SIZE x SIZE (0: keep) [512]")
    sty.add_argument("--mode", choices=("stats", "histogram"), default="stats", help="color transfer [stats]")
    sty.set_defaults(func=_stylize)

    smp = sub.add_parser("sample", help="a ready offline sample from scikit-image's bundled images")
    smp.add_argument("--out", required=True, help="output folder")
    smp.add_argument("--size", type=int, default=512, help="image size [512]")
    smp.add_argument("--mode", choices=("stats", "histogram"), default="stats", help="color transfer [stats]")
    smp.add_argument("--limit", type=int, default=None, help="only the first N items")
    smp.set_defaults(func=_sample)
    return parser
