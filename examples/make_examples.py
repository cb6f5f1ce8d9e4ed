"""Regenerate the example inputs from scikit-image's bundled public-domain/CC0 images.

    pip install scikit-image && python examples/make_examples.py

Writes ``<name>.png`` (256x256 RGB), ``<name>_mask.png`` (white = inpaint) and
``items.jsonl`` (a manifest for ``attnctl inpaint --manifest examples/items.jsonl``).
The committed images are 256x256 to keep the repository small; pass ``--size 512`` for
SD1.5's native resolution.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

# name: (skimage loader, mask box as fractions (top, left, bottom, right), prompt)
EXAMPLES = {
    "chelsea": ("chelsea", (0.30, 0.35, 0.75, 0.70), "a small owl"),
    "coffee": ("coffee", (0.15, 0.25, 0.70, 0.75), "a bowl of strawberries"),
    "astronaut": ("astronaut", (0.05, 0.55, 0.45, 0.95), "a planet with rings"),
    "rocket": ("rocket", (0.45, 0.05, 0.85, 0.40), "a red fire truck"),
}


def center_square(arr: np.ndarray) -> np.ndarray:
    h, w = arr.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return arr[top : top + s, left : left + s]


def main() -> None:
    from skimage import data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="side of the square images (multiple of 8) [256]")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="output folder [examples/]")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (loader, (t, l, b, r), prompt) in EXAMPLES.items():
        arr = center_square(getattr(data, loader)())
        image = Image.fromarray(arr).convert("RGB").resize((args.size, args.size), Image.LANCZOS)
        image.save(out / f"{name}.png", optimize=True)
        mask = np.zeros((args.size, args.size), dtype=np.uint8)
        mask[int(t * args.size) : int(b * args.size), int(l * args.size) : int(r * args.size)] = 255
        Image.fromarray(mask).save(out / f"{name}_mask.png", optimize=True)
        rows.append({"image": f"{name}.png", "mask": f"{name}_mask.png", "prompt": prompt, "seed": 0, "name": name})
    (out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} examples to {out}")


if __name__ == "__main__":
    main()
