"""What gets evaluated: a recipe (plus overrides), or a folder of precomputed outputs.

A method's ``fingerprint`` is stored next to its outputs, so resuming into a folder made
with other settings fails loudly instead of mixing results.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from PIL import Image

from attnctl.errors import InputError
from harmonpaint_recipe.progress import step_bar_config

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._+=-]+$")


class InpaintFn(Protocol):
    """``fn(image, mask, prompt, *, seed, item_id) -> PIL.Image`` for one item."""

    def __call__(self, image: Image.Image, mask: Image.Image, prompt: str, *, seed: int | None, item_id: str) -> Image.Image: ...


@dataclass(frozen=True)
class Method:
    """A named column of the results table."""

    name: str
    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    outputs_dir: Path | None = None  # precomputed outputs <id>.png (external baselines)
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not _SAFE_NAME.match(self.name):
            raise InputError(f"method name '{self.name}' must use only letters, digits and . _ + = - (it names folders)")

    def fingerprint(self, seed: int) -> dict:
        """What determines this method's outputs."""
        if self.outputs_dir is not None:
            return {"outputs_dir": str(Path(self.outputs_dir).resolve())}
        return {"recipe": self.recipe, "overrides": list(self.overrides), "seed": seed}


def parse_external(spec: str) -> Method:
    """``NAME=DIR`` -> a method whose outputs are ``DIR/<item id>.png``."""
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise InputError(f"--external '{spec}': expected NAME=DIR (DIR holds <item id>.png per item)")
    if not Path(folder).is_dir():
        raise InputError(f"--external '{spec}': '{folder}' is not a folder")
    return Method(name=name, outputs_dir=Path(folder))


def external_inpaint(method: Method) -> InpaintFn:
    """Reader of precomputed outputs, with the signature of an inpaint function."""

    def read(image: Image.Image, mask: Image.Image, prompt: str, *, seed: int | None, item_id: str) -> Image.Image:
        for suffix in (".png", ".jpg", ".jpeg", ".webp"):
            p = Path(method.outputs_dir) / f"{item_id}{suffix}"
            if p.is_file():
                return Image.open(p).convert("RGB")
        raise InputError(f"--external {method.name}: no output for item '{item_id}' in '{method.outputs_dir}'")

    return read


def recipe_inpaint(method: Method) -> InpaintFn:
    """An inpaint function running ``method.recipe`` through ``harmonpaint_recipe``; the
    pipeline is loaded once and reused for every item."""
    import harmonpaint_recipe as hr

    if not hasattr(hr, "load_recipe") or not hasattr(hr, "inpaint"):
        raise InputError("this install has no recipe runner (harmonpaint_recipe.load_recipe/inpaint); use --external")
    recipe = hr.load_recipe(method.recipe, list(method.overrides))
    pipe = hr.load_pipeline(recipe)
    pipe.set_progress_bar_config(**step_bar_config(own_bar=True))  # the runner's per-item bar is the one bar

    def run(image: Image.Image, mask: Image.Image, prompt: str, *, seed: int | None, item_id: str) -> Image.Image:
        return hr.inpaint(image, mask, prompt, recipe=recipe, pipe=pipe, seed=seed)

    return run


def default_inpaint_factory(method: Method) -> InpaintFn:
    """Precomputed outputs for external methods, the recipe runner otherwise."""
    return external_inpaint(method) if method.outputs_dir is not None else recipe_inpaint(method)

