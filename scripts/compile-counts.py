"""Count graphs, graph breaks and recompilations of torch.compile for every shipped recipe.

Usage: python scripts/compile-counts.py OUT.md [RECIPE ...]

Builds the tiny random-weight SD and SDXL inpainting pipelines, compiles the UNet's forward
with dynamo's ``eager`` backend (graph capture only) and runs each recipe twice through
``Runner`` (``harmonpaint_recipe.bench.compile_counts``). Writes the Markdown table of
docs/benchmarks.md with, under it, every recompilation's failed guard.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from attnctl.testing import save_tiny_inpaint_pipeline
from harmonpaint_recipe.bench.compile_counts import TABLE_HEAD, measure_recipe, prompt_for
from harmonpaint_recipe.loading import recipe_names


def _inputs() -> tuple[Image.Image, Image.Image]:
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 20:44] = 255
    return image, Image.fromarray(mask)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    out, names = Path(argv[0]), argv[1:] or recipe_names()
    rows, reasons = [TABLE_HEAD], []
    with tempfile.TemporaryDirectory() as tmp:
        pipes = {}
        for kind, cls in (("sd", StableDiffusionInpaintPipeline), ("sdxl", StableDiffusionXLInpaintPipeline)):
            pipes[kind] = cls.from_pretrained(str(save_tiny_inpaint_pipeline(Path(tmp) / kind, kind=kind)))
            pipes[kind].set_progress_bar_config(disable=True)
        for name in names:
            start = time.perf_counter()
            prompt, overrides = prompt_for(name)
            pipe = pipes["sdxl" if "sdxl" in name else "sd"]
            counts = measure_recipe(pipe, name, prompt, *_inputs(), steps=6, overrides=overrides)
            rows.append(counts.row())
            reasons += [f"- `{name}`: {r}" for r in counts.recompile_reasons]
            print(f"{counts.row()}  ({time.perf_counter() - start:.0f} s)", flush=True)
    text = "\n".join(rows) + "\n\nRecompilations (the guard that failed):\n\n" + "\n".join(reasons) + "\n"
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
