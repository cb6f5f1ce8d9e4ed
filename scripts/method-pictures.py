"""The pictures of docs/methods.md: each method on the testbed model, beside stock SDI with the same seed.

    python scripts/method-pictures.py --out docs/methods

Every picture is a grid; each row is one testbed scene (its input with the mask outlined), then
the method's images and stock inpainting (recipe ``sdi``) with the same seed and prompt. The
testbed model is small and trained on a toy world of coloured shapes on textured backgrounds,
so what the pictures show is the mechanism (a word swapped, a look kept), not image quality.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from harmonpaint_recipe.files import atomic_save_image
from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.model import load_pipeline
from harmonpaint_recipe.runner import Runner
from harmonpaint_recipe.testbed.world import render_scene, sample_scene

TILE = 160
STEPS = 25


def scene_inputs(seed: int, **pin):
    """A testbed scene (styled background, its object) and its mask, as the runner's inputs."""
    rendered = render_scene(sample_scene(seed, "demo", mask_kind="box", styled=True, **pin))
    image = Image.fromarray((rendered.styled * 255).round().astype(np.uint8))
    mask = Image.fromarray((rendered.mask > 0).astype(np.uint8) * 255)
    return prepare_inputs(image, mask)


def outlined(inputs) -> Image.Image:
    image = inputs.image.convert("RGB").resize((TILE, TILE), Image.NEAREST)
    edge = Image.fromarray((inputs.mask_array > 0).astype(np.uint8) * 255).resize((TILE, TILE), Image.NEAREST)
    box = edge.getbbox()
    if box:
        ImageDraw.Draw(image).rectangle(box, outline=(255, 255, 255), width=2)
    return image


def grid(rows: list[list[tuple[str, Image.Image]]]) -> Image.Image:
    """Tiles with a caption above each (rows may differ in length)."""
    cols = max(len(r) for r in rows)
    head = 30
    out = Image.new("RGB", (cols * TILE, len(rows) * (TILE + head)), "white")
    draw = ImageDraw.Draw(out)
    for y, row in enumerate(rows):
        for x, (label, image) in enumerate(row):
            top = y * (TILE + head)
            for k, line in enumerate(label.split("\n")[:2]):
                draw.text((x * TILE + 4, top + 2 + 13 * k), line, fill=(0, 0, 0))
            out.paste(image.convert("RGB").resize((TILE, TILE), Image.NEAREST), (x * TILE, top + head))
    return out


class Pictures:
    def __init__(self, out: Path):
        self.out = out
        self.pipe = load_pipeline(load_recipe("sdi", [f"model.pretrained=testbed", "model.device=cpu"]))
        self.pipe.set_progress_bar_config(disable=True)

    def run(self, recipe: str, overrides: list[str], inputs, prompt: str, seed: int):
        cfg = load_recipe(recipe, ["model.pretrained=testbed", f"sampler.steps={STEPS}", *overrides])
        with Runner(self.pipe, cfg) as runner:
            return runner(inputs, prompt, seed)

    def save(self, name: str, rows) -> None:
        atomic_save_image(self.out / f"{name}.png", grid(rows))
        print(f"wrote {self.out / name}.png", file=sys.stderr)

    def p2p(self) -> None:
        rows = []
        for seed in (1, 2, 3):
            inputs = scene_inputs(seed, shape="circle")
            over = ["strategies.p2p.source_prompt=a red circle", "strategies.p2p.keep_source=true",
                    "strategies.p2p.blend_words=[red,blue]"]
            result = self.run("p2p-replace", over, inputs, "a blue circle", seed)
            stock = self.run("sdi", [], inputs, "a blue circle", seed).image
            rows.append([("input", outlined(inputs)), ("source\na red circle", result.rows["p2p"]),
                         ("p2p-replace\na blue circle", result.image), ("sdi\na blue circle", stock)])
        self.save("p2p", rows)

    def masactrl(self) -> None:
        rows = []
        for seed in (1, 2, 3):
            inputs = scene_inputs(seed)
            over = ["strategies.masactrl.source_prompt=a red star", "strategies.masactrl.keep_source=true"]
            result = self.run("masactrl", over, inputs, "a red square", seed)
            stock = self.run("sdi", [], inputs, "a red square", seed).image
            rows.append([("input", outlined(inputs)), ("source\na red star", result.rows["masactrl"]),
                         ("masactrl\na red square", result.image), ("sdi\na red square", stock)])
        self.save("masactrl", rows)

    def style_aligned(self) -> None:
        prompts = ["a blue square", "a green star", "a yellow triangle"]
        over = ["strategies.style.reference_prompt=a purple circle", "strategies.style.keep_reference=true",
                "strategies.style.reference_seed=7"]
        aligned, stock = [], []
        for k, prompt in enumerate(prompts):
            inputs = scene_inputs(10 + k)
            result = self.run("style-aligned", over, inputs, prompt, 10 + k)
            aligned.append((f"style-aligned\n{prompt}", result.image))
            stock.append((f"sdi\n{prompt}", self.run("sdi", [], inputs, prompt, 10 + k).image))
            reference = result.rows["style"]
        self.save("style-aligned", [[("reference\na purple circle", reference), *aligned], [("", Image.new("RGB", (8, 8), "white")), *stock]])

    def attend_excite(self) -> None:
        rows = []
        prompt = "a red circle a blue square"
        for seed in (1, 2, 3):
            inputs = scene_inputs(seed)
            result = self.run("attend-excite", ["strategies.excite.tokens=[3,6]"], inputs, prompt, seed)
            stock = self.run("sdi", [], inputs, prompt, seed).image
            rows.append([("input", outlined(inputs)), ("attend-excite\ncircle, square", result.image),
                         (f"sdi\n{prompt}", stock)])
        self.save("attend-excite", rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/methods"))
    parser.add_argument("--only", nargs="*", default=["p2p", "masactrl", "style_aligned", "attend_excite"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pictures = Pictures(args.out)
    for name in args.only:
        getattr(pictures, name)()


if __name__ == "__main__":
    main()
