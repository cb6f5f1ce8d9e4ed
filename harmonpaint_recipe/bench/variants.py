"""The benchmarked variants: one pipeline, five ways of running it.

Every variant makes the same image (same pipeline object, inputs, seed and call
arguments); they differ only in what is attached to the pipeline. ``setup`` attaches
(untimed), ``__call__`` makes one image (timed), ``teardown`` restores the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from attnctl.registry import Registry
from attnctl.layout import BatchLayout


@dataclass
class BenchInputs:
    """What every variant runs on.

    Attributes:
        pipe: the diffusers inpainting pipeline (already on its device and dtype).
        call_kwargs: ``call_kwargs()`` -> pipeline keyword arguments with a fresh seeded generator.
        mask: binary mask [H, W] (1 = inpaint) at image size, as the pipeline gets it.
        prompt: the prompt.
        recipe: the HarmonPaint recipe name the strategies come from.
    """

    pipe: Any
    call_kwargs: Callable[[], dict[str, Any]]
    mask: torch.Tensor
    prompt: str
    recipe: str = "harmonpaint"
    layout: BatchLayout = field(default_factory=lambda: BatchLayout.for_pipeline(num_prompts=1, cfg=True))

    def token_indices(self) -> list[list[int]]:
        from attnctl.layout import pipeline_token_indices

        return [pipeline_token_indices(self.pipe, self.prompt)]


class Variant:
    """Base: the stock pipeline, nothing attached."""

    name = "stock"
    description = "diffusers pipeline, no attnctl"

    def setup(self, inputs: BenchInputs) -> None:
        self.inputs = inputs

    def __call__(self) -> Any:
        return self.inputs.pipe(**self.inputs.call_kwargs()).images

    def teardown(self) -> None:
        pass


class EagerStockVariant(Variant):
    """Stock, with the UNet's own (uncompiled) forward even under ``--compile``: the baseline
    a compiled variant must beat. Without ``--compile`` it is the same as ``stock``."""

    name = "stock-eager"
    description = "diffusers pipeline, no attnctl, UNet not compiled"

    def setup(self, inputs: BenchInputs) -> None:
        super().setup(inputs)
        # --compile sets the compiled forward as an instance attribute; without it the class's forward runs
        self._compiled = inputs.pipe.unet.__dict__.pop("forward", None)

    def teardown(self) -> None:
        if self._compiled is not None:
            self.inputs.pipe.unet.forward = self._compiled


class RecipeVariant(Variant):
    """Attached through ``harmonpaint_recipe.runner.Runner`` with a recipe and overrides."""

    def __init__(self, name: str, description: str, recipe: str | None,
                 overrides: tuple[str, ...] | Callable[[str], tuple[str, ...]] = ()):
        self.name, self.description = name, description
        self.recipe, self.overrides = recipe, overrides  # or a function of the bench prompt

    def setup(self, inputs: BenchInputs) -> None:
        from harmonpaint_recipe.loading import load_recipe
        from harmonpaint_recipe.runner import Runner

        self.inputs = inputs
        overrides = list(self.overrides(inputs.prompt) if callable(self.overrides) else self.overrides)
        if getattr(inputs.pipe, "unet", None) is None:  # a transformer: every variant steps with its own scheduler
            overrides.append("sampler.scheduler=pipeline")
        cfg = load_recipe(self.recipe or inputs.recipe, overrides)
        self.runner = Runner(inputs.pipe, cfg)
        self.tokens = inputs.token_indices()

    def __call__(self) -> Any:
        inputs = self.inputs
        with self.runner.controller.run(inputs.layout, mask=inputs.mask, token_indices=self.tokens,
                                        prompts=[inputs.prompt]):
            return inputs.pipe(**inputs.call_kwargs()).images

    def teardown(self) -> None:
        self.runner.close()


class NaiveVariant(Variant):
    """The research-code reference implementation of the same recipe (``bench.naive``)."""

    name = "naive"
    description = "same recipe, explicit softmax maps, 2*HW keys, A&E-style full fwd+bwd"

    def setup(self, inputs: BenchInputs) -> None:
        from harmonpaint_recipe.bench.naive import NaiveHarmonPaint, NaiveSettings
        from harmonpaint_recipe.loading import load_recipe, resolved

        self.inputs = inputs
        settings = NaiveSettings.from_recipe(resolved(load_recipe(inputs.recipe)))
        self.naive = NaiveHarmonPaint(inputs.pipe, settings)
        self.naive.install()
        self.tokens = inputs.token_indices()[0]

    def __call__(self) -> Any:
        with self.naive.run(self.inputs.mask, self.tokens):
            return self.inputs.pipe(**self.inputs.call_kwargs()).images

    def teardown(self) -> None:
        self.naive.remove()


class ImageRecipeVariant(RecipeVariant):
    """A method that reads a reference or source image: the bench's own input image, saved for it
    (``{image}`` in the overrides is its path)."""

    def setup(self, inputs: BenchInputs) -> None:
        import tempfile
        from pathlib import Path

        self._folder = tempfile.TemporaryDirectory()
        path = Path(self._folder.name) / "reference.png"
        inputs.call_kwargs()["image"].save(path)
        template = self.overrides
        self.overrides = tuple(o.format(image=path) for o in template)
        try:
            super().setup(inputs)
        finally:
            self.overrides = template

    def teardown(self) -> None:
        super().teardown()
        self._folder.cleanup()


def _swap_last_word(prompt: str) -> tuple[str, ...]:
    """P2P's settings for a bench prompt: the source has its last word swapped; the blend follows that word."""
    *head, last = prompt.split(" ")
    source = " ".join([*head, "stone" if last != "stone" else "grass"])
    return (f"strategies.p2p.source_prompt={source}", f"strategies.p2p.blend_words=[{source.split(' ')[-1]},{last}]")


#: variant name -> factory, in report order
VARIANTS: Registry[Callable[[], Variant]] = Registry("variant", {
    "stock": Variant,
    "stock-eager": EagerStockVariant,
    "idle": lambda: RecipeVariant("idle", "attached, no active strategy (recipe sdi)", "sdi"),
    "sams+makvs": lambda: RecipeVariant(
        "sams+makvs", "HarmonPaint without the steer loss", None, ("strategies.steer.enabled=false",)
    ),
    "harmonpaint": lambda: RecipeVariant("harmonpaint", "full HarmonPaint recipe", None),
    "naive": NaiveVariant,
    "harmonpaint+steer": lambda: RecipeVariant(
        "harmonpaint+steer", "the transformer recipe with the steer loss on (read at every joint site)", None,
        ("strategies.steer.enabled=true", "strategies.steer.read_sites=joint"),
    ),
    "probe-cross": lambda: RecipeVariant(
        "probe-cross", "no strategy (recipe sdi), cross_maps probe at cross/4,cross/2 on every step", "sdi",
        ("probes.cross_maps.enabled=true", "probes.cross_maps.steps=all"),
    ),
    # the methods (docs/methods.md), each with its recipe's defaults; the source or reference
    # prompt is the bench prompt's own words, so every variant runs on any architecture
    "p2p": lambda: RecipeVariant("p2p", "Prompt-to-Prompt, last word swapped, local blend (recipe p2p-replace)",
                                 "p2p-replace", _swap_last_word),
    "masactrl": lambda: RecipeVariant("masactrl", "MasaCtrl, the authors' sites and steps (recipe masactrl)",
                                      "masactrl", lambda prompt: (f"strategies.masa.source_prompt={prompt}, seen from above",)),
    "style-aligned": lambda: RecipeVariant("style-aligned", "StyleAligned, every self site (recipe style-aligned)",
                                           "style-aligned", lambda prompt: (f"strategies.style.reference_prompt={prompt}, in origami style",)),
    "attend-excite": lambda: RecipeVariant("attend-excite", "Attend-and-Excite on the first two tokens (recipe attend-excite)",
                                           "attend-excite", ("strategies.excite.tokens=[1,2]",)),
    "pag": lambda: RecipeVariant("pag", "perturbed-attention guidance at the mid block (recipe pag)", "pag"),
    "reference-only": lambda: ImageRecipeVariant("reference-only", "reference-only, the input image as the "
                                                 "reference (recipe reference-only)", "reference-only",
                                                 ("strategies.ref.image={image}",)),
    "hd-painter": lambda: RecipeVariant("hd-painter", "HD-Painter: PAIntA and RASG (recipe hd-painter)", "hd-painter"),
    "vsp": lambda: RecipeVariant("vsp", "Visual Style Prompting, a generated reference (recipe visual-style-prompting)",
                                 "visual-style-prompting"),
    "masactrl-real": lambda: ImageRecipeVariant("masactrl-real", "MasaCtrl with the input image inverted as the "
                                                "source (recipe masactrl-real)", "masactrl-real",
                                                ("strategies.masa.source_image={image}",)),
    "style-aligned-real": lambda: ImageRecipeVariant("style-aligned-real", "StyleAligned with the input image "
                                                     "inverted as the reference (recipe style-aligned-real)",
                                                     "style-aligned-real", ("strategies.style.reference_image={image}",)),
})
#: the method variants (``--variants methods`` names them all)
METHODS = ("p2p", "masactrl", "style-aligned", "attend-excite", "pag", "reference-only", "hd-painter", "vsp",
           "masactrl-real", "style-aligned-real")
#: variants run only when named in ``--variants`` (not part of ``all``)
OPT_IN = ("stock-eager", "probe-cross", "harmonpaint+steer", *METHODS)
#: what runs on a transformer architecture (SD3, FLUX); ``all`` there is every one of them
TRANSFORMER_VARIANTS = ("stock", "idle", "sams+makvs", "harmonpaint+steer")
#: what runs on transformer architectures only (its overrides name joint sites)
TRANSFORMER_ONLY = ("harmonpaint+steer",)


def parse_variants(text: str | None, transformer: bool = False) -> list[str]:
    """``"stock,idle"`` -> names in report order; ``stock`` is always included (every ratio is to it).

    ``all`` (the default) is every variant but the opt-in ones (``OPT_IN``).
    """
    if transformer:
        return _transformer_variants(text)
    if not text or text == "all":
        return [n for n in VARIANTS.names() if n not in OPT_IN]
    parts = [p.strip() for p in text.split(",")]
    groups = {"all": [n for n in VARIANTS.names() if n not in OPT_IN], "methods": list(METHODS)}
    named = [p for p in parts if p not in groups]
    names = {"stock", *(n for p in parts for n in groups.get(p, ())),
             *(VARIANTS.parse_list(",".join(named), "--variants") if named else ())}
    only = sorted(names & set(TRANSFORMER_ONLY))
    if only:
        from attnctl.errors import ConfigError

        raise ConfigError(f"--variants {', '.join(only)} run on transformer architectures only "
                          "(--arch mid-flux-fill, mid-sd35, ...)")
    return [n for n in VARIANTS if n in names]


def _transformer_variants(text: str | None) -> list[str]:
    """The variants of a transformer architecture: ``all`` is ``TRANSFORMER_VARIANTS``; others are refused."""
    from attnctl.errors import ConfigError

    if not text or text == "all":
        return list(TRANSFORMER_VARIANTS)
    names = ["stock", *VARIANTS.parse_list(text, "--variants")]
    other = [n for n in names if n not in TRANSFORMER_VARIANTS]
    if other:
        raise ConfigError(f"--variants {', '.join(other)} run on UNet architectures only; on a transformer "
                          f"architecture choose among {', '.join(TRANSFORMER_VARIANTS)}")
    return [n for n in VARIANTS if n in names]
