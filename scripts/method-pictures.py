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
    image = Image.fromarray(rendered.styled)  # uint8 already
    mask = Image.fromarray((rendered.mask > 0).astype(np.uint8) * 255)
    return prepare_inputs(image, mask)


def scene_file(folder: Path, name: str, seed: int, **pin) -> Path:
    """A styled testbed scene saved as ``folder/name.png`` (a reference or source image)."""
    path = folder / f"{name}.png"
    Image.fromarray(render_scene(sample_scene(seed, "demo", mask_kind="box", styled=True, **pin)).styled).save(path)
    return path


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
        self.pipe = load_pipeline(load_recipe("sdi", ["model.pretrained=testbed", "model.device=cpu"]))
        self.pipe.set_progress_bar_config(disable=True)

    def run(self, recipe: str, overrides: list[str], inputs, prompt: str, seed: int):
        cfg = load_recipe(recipe, ["model.pretrained=testbed", f"sampler.steps={STEPS}", *overrides])
        with Runner(self.pipe, cfg) as runner:
            return runner(inputs, prompt, seed)

    def save(self, name: str, rows) -> None:
        atomic_save_image(self.out / f"{name}.png", grid(rows))
        print(f"wrote {self.out / name}.png", file=sys.stderr)

    def sdi(self, inputs, prompt: str, seed: int) -> tuple[str, Image.Image]:
        """Stock inpainting's tile: recipe ``sdi`` on the same inputs, prompt and seed."""
        return (f"sdi\n{prompt}", self.run("sdi", [], inputs, prompt, seed).image)

    def scene_rows(self, columns, **pin) -> list[list[tuple[str, Image.Image]]]:
        """One row per seed 1, 2, 3: the scene's input (mask outlined), then ``columns(inputs, seed)``."""
        rows = []
        for seed in (1, 2, 3):
            inputs = scene_inputs(seed, **pin)
            rows.append([("input", outlined(inputs)), *columns(inputs, seed)])
        return rows

    def p2p(self) -> None:
        over = ["strategies.p2p.source_prompt=a red circle", "strategies.p2p.keep_source=true",
                "strategies.p2p.blend_words=[red,blue]"]

        def columns(inputs, seed):
            result = self.run("p2p-replace", over, inputs, "a blue circle", seed)
            return [("source\na red circle", result.rows["p2p"]),
                    ("p2p-replace\na blue circle", result.image), self.sdi(inputs, "a blue circle", seed)]

        self.save("p2p", self.scene_rows(columns, shape="circle"))

    def masactrl(self) -> None:
        source = ["strategies.masa.source_prompt=a purple star", "strategies.masa.keep_source=true"]
        everywhere = [*source, "strategies.masa.sites=self", "strategies.masa.start_step=0"]

        def columns(inputs, seed):
            result = self.run("masactrl", source, inputs, "a square", seed)
            wide = self.run("masactrl", everywhere, inputs, "a square", seed).image
            return [("source\na purple star", result.rows["masa"]),
                    ("masactrl (authors' sites)\na square", result.image),
                    ("masactrl, every self site\nfrom step 0: a square", wide), self.sdi(inputs, "a square", seed)]

        self.save("masactrl", self.scene_rows(columns))

    def style_aligned(self) -> None:
        prompts = ["a square", "a star", "a triangle"]
        over = ["strategies.style.reference_prompt=a purple circle", "strategies.style.keep_reference=true",
                "strategies.style.reference_seed=7"]
        rows = {"defaults": [], "shift": [], "sdi": []}
        for k, prompt in enumerate(prompts):
            inputs = scene_inputs(10 + k)
            result = self.run("style-aligned", over, inputs, prompt, 10 + k)
            rows["defaults"].append((f"style-aligned\n{prompt}", result.image))
            shifted = self.run("style-aligned", [*over, "strategies.style.shared_score_shift=2.0"], inputs, prompt, 10 + k)
            rows["shift"].append((f"style-aligned, shift 2\n{prompt}", shifted.image))
            rows["sdi"].append(self.sdi(inputs, prompt, 10 + k))
            reference = result.rows["style"]
        blank = ("", Image.new("RGB", (8, 8), "white"))
        self.save("style-aligned", [[("reference\na purple circle", reference), *rows["defaults"]],
                                    [blank, *rows["shift"]], [blank, *rows["sdi"]]])

    def attend_excite(self) -> None:
        prompt = "a red circle a blue square"
        # the testbed's 64 px images put cross/4 at 4x4; cross/2 (8x8) is the grid closest to the paper's 16x16
        base = ["strategies.excite.tokens=[3,6]", "strategies.excite.read_sites=cross/2"]

        def columns(inputs, seed):
            tiles = [self.sdi(inputs, prompt, seed)]
            for scale in (20, 200):
                result = self.run("attend-excite", [*base, f"strategies.excite.scale_factor={scale}"], inputs, prompt,
                                  seed)
                losses = [h["loss"][0] for h in result.results["excite"]]
                tiles.append((f"attend-excite, scale {scale}\nloss {losses[0]:.2f} -> {losses[-1]:.2f}", result.image))
            return tiles

        self.save("attend-excite", self.scene_rows(columns))

    def pag(self) -> None:
        prompt = "a red circle"

        def columns(inputs, seed):
            return [self.sdi(inputs, prompt, seed),
                    ("pag (mid block)\nscale 3", self.run("pag", [], inputs, prompt, seed).image),
                    ("seg (mid block)\ninfinite blur", self.run("seg", [], inputs, prompt, seed).image),
                    ("pag, every self site\nscale 3", self.run("pag", ["strategies.pag.sites=self"], inputs, prompt,
                                                               seed).image)]

        self.save("pag", self.scene_rows(columns))

    def reference_only(self) -> None:
        import tempfile

        prompt = "a blue square"
        with tempfile.TemporaryDirectory() as tmp:
            reference = scene_file(Path(tmp), "reference", 40, style="checks")
            over = [f"strategies.ref.image={reference}"]

            def columns(inputs, seed):
                return [("reference", Image.open(reference).convert("RGB")),
                        (f"reference-only\n{prompt}", self.run("reference-only", over, inputs, prompt, seed).image),
                        self.sdi(inputs, prompt, seed)]

            rows = self.scene_rows(columns)
        self.save("reference-only", rows)

    def hd_painter(self) -> None:
        prompt = "a red circle"
        plain = ["sampler.negative_prompt=null", "sampler.positive_prompt=null"]  # words the toy vocabulary lacks

        def columns(inputs, seed):
            def hd(overrides):
                return self.run("hd-painter", overrides, inputs, prompt, seed).image

            return [self.sdi(inputs, prompt, seed), ("hd-painter\n(recipe as shipped)", hd([])),
                    ("hd-painter\nwithout its words", hd(plain)),
                    ("painta alone", hd([*plain, "strategies.hd.rasg=false"])),
                    ("rasg alone", hd([*plain, "strategies.hd.painta=false"]))]

        self.save("hd-painter", self.scene_rows(columns))

    def vsp(self) -> None:
        import tempfile

        prompt = "a blue square"
        generated = ["strategies.vsp.reference_prompt=a purple circle", "strategies.vsp.keep_reference=true"]
        with tempfile.TemporaryDirectory() as tmp:
            reference = scene_file(Path(tmp), "reference", 40, style="checks")

            def columns(inputs, seed):
                result = self.run("visual-style-prompting", generated, inputs, prompt, seed)
                real = self.run("visual-style-prompting", [f"strategies.vsp.reference_image={reference}"], inputs,
                                prompt, seed).image
                return [("reference\na purple circle", result.rows["vsp"]), (f"vsp\n{prompt}", result.image),
                        ("image reference", Image.open(reference).convert("RGB")),
                        (f"vsp, image reference\n{prompt}", real), self.sdi(inputs, prompt, seed)]

            rows = self.scene_rows(columns)
        self.save("vsp", rows)

    def real_images(self) -> None:
        """MasaCtrl and StyleAligned with a photo (a testbed scene) as the source / reference."""
        import tempfile

        prompt = "a square"
        with tempfile.TemporaryDirectory() as tmp:
            photo = scene_file(Path(tmp), "photo", 41, shape="star", colour="purple")

            def columns(inputs, seed):
                masa = self.run("masactrl-real", [f"strategies.masa.source_image={photo}", "strategies.masa.sites=self",
                                                  "strategies.masa.start_step=0"], inputs, prompt, seed).image
                style = self.run("style-aligned-real", [f"strategies.style.reference_image={photo}",
                                                        "strategies.style.reference_prompt=a purple star"],
                                 inputs, prompt, seed).image
                return [("photo", Image.open(photo).convert("RGB")), ("masactrl-real\nevery self site, step 0", masa),
                        ("style-aligned-real", style), self.sdi(inputs, prompt, seed)]

            rows = self.scene_rows(columns)
        self.save("real-images", rows)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/methods"))
    parser.add_argument("--only", nargs="*",
                        default=["p2p", "masactrl", "style_aligned", "attend_excite", "pag", "reference_only",
                                 "hd_painter", "vsp", "real_images"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    pictures = Pictures(args.out)
    for name in args.only:
        getattr(pictures, name)()


if __name__ == "__main__":
    main()
