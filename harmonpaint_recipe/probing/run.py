"""Run a recipe with probes switched on and keep what they measured: ``probe(...)``.

A probe is a strategy instance in the recipe's ``probes`` section (``cross_maps``,
``self_pca``, ``curves`` are built in; any installed probe plugin works the same way). The
run is the recipe's own run: probes only read attention, so the image is the one
``inpaint`` makes with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from attnctl.errors import ConfigError
from harmonpaint_recipe.inputs import PreparedInputs, prepare_inputs
from harmonpaint_recipe.loading import load_recipe, resolved

#: the probes ``attnctl probe`` and ``probe()`` switch on unless told otherwise
DEFAULT_PROBES = ("cross_maps", "curves")


@dataclass
class ProbeRun:
    """One probed run: the image, and every probe's result.

    Attributes:
        label: what pictures and the JSON call this run (the recipe name).
        recipe: the recipe as run (probes switched on).
        image: the inpainted image (the same ``inpaint`` makes with this seed).
        seed: the noise seed.
        prompt: the prompt.
        mask: binary mask [H, W] (1 = inpaint) at image size.
        results: probe instance -> its result (``CrossMaps``, ``SelfPca``, ``Curves`` or a
            third-party probe's object); ``record()`` turns them into numbers.
        token_labels: text position -> the token's text, for picture labels.
    """

    label: str
    recipe: DictConfig
    image: Image.Image
    seed: int
    prompt: str
    mask: np.ndarray
    results: dict[str, Any] = field(default_factory=dict)
    token_labels: dict[int, str] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """Every number of every probe (JSON-ready), with what identifies the run."""
        from harmonpaint_recipe.probing.record import result_record

        return {
            "label": self.label,
            "seed": self.seed,
            "prompt": self.prompt,
            "tokens": {str(k): v for k, v in sorted(self.token_labels.items())},
            "probes": {name: result_record(result) for name, result in sorted(self.results.items())},
        }

    def pictures(self) -> dict[str, Image.Image]:
        """The pictures of this run: probe kind (``cross_maps``, ``self_pca``, ``curves``) -> image."""
        from harmonpaint_recipe.probing.render import pictures

        return pictures([self])


def recipe_label(recipe: str | Path | DictConfig) -> str:
    """What pictures call a run: the recipe's name, a YAML file's stem, or ``recipe``."""
    if isinstance(recipe, DictConfig):
        return "recipe"
    text = str(recipe)
    return Path(text).stem if text.endswith((".yaml", ".yml")) else text


def probe_overrides(probes: Iterable[str]) -> list[str]:
    """``["cross_maps"]`` -> ``["probes.cross_maps.enabled=true"]``."""
    names = [p.strip() for p in probes if p.strip()]
    if not names:
        raise ConfigError("no probe to switch on; name at least one, e.g. cross_maps,curves (see `attnctl strategies`)")
    return [f"probes.{name}.enabled=true" for name in names]


def enabled_probes(recipe: DictConfig) -> list[str]:
    """Probe instances of ``recipe`` that are switched on."""
    return [name for name, settings in (resolved(recipe).get("probes") or {}).items()
            if (settings or {}).get("enabled", False)]


def token_labels(tokenizer: Any, prompt: str) -> dict[int, str]:
    """Text position -> the token's text (``</w>`` word ends dropped), for the prompt's own tokens."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    labels = {}
    for position in range(1, len(ids) - 1):
        text = tokenizer.convert_ids_to_tokens(ids[position])
        labels[position] = str(text).replace("</w>", "").strip() or repr(str(text))
    return labels


def run_probed(pipe: Any, recipe: DictConfig, inputs: PreparedInputs, prompt: str, seed: int | None,
               label: str, manager: Any = None, on_step: Callable[[int, int], None] | None = None) -> ProbeRun:
    """Run ``recipe`` (its probes switched on already) on ``pipe`` and collect a ``ProbeRun``."""
    from harmonpaint_recipe.runner import Runner

    if not enabled_probes(recipe):
        raise ConfigError("the recipe has no probe switched on; add e.g. probes.cross_maps.enabled=true")
    with Runner(pipe, recipe, manager=manager) as runner:
        result = runner(inputs, prompt, seed, on_step=on_step)
    return ProbeRun(label=label, recipe=recipe, image=result.image, seed=result.seed, prompt=prompt,
                    mask=np.asarray(inputs.mask_array, dtype=np.float32), results=dict(result.probes),
                    token_labels=token_labels(pipe.tokenizer, prompt))


def probe(
    image: str | Path | Image.Image,
    mask: str | Path | Image.Image,
    prompt: str,
    recipe: str | Path | DictConfig = "harmonpaint",
    probes: Sequence[str] = DEFAULT_PROBES,
    pipe: Any = None,
    seed: int | None = None,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    resize_mask: bool = False,
    manager: Any = None,
) -> ProbeRun:
    """Inpaint like ``inpaint`` with ``probes`` switched on; return the image and what they measured.

    Args:
        image, mask, prompt: as for ``inpaint`` (white = region to inpaint).
        recipe: shipped recipe name, YAML path or a recipe from ``load_recipe``.
        probes: probe instances to switch on (``cross_maps``, ``self_pca``, ``curves``; the
            PCA probe materializes self-attention maps and costs more). Others the recipe
            already enables stay on.
        pipe: a pipeline from ``load_pipeline`` to reuse (default: load the recipe's model).
        seed: noise seed (default: a random one, recorded in the result).
        overrides: recipe overrides, e.g. ``["probes.cross_maps.steps=all"]``.
        resize_mask: resize a mask of another size to the image.
        manager: strategy plugin manager (default: entry points).

    Returns:
        A ``ProbeRun``: ``.image``, ``.results`` (arrays per probe), ``.pictures()`` (PIL
        images of the grids and curves), ``.record()`` (every number).
    """
    from harmonpaint_recipe.loading import load_recipe as load
    from harmonpaint_recipe.model import load_pipeline

    cfg = load(recipe, overrides, manager=manager)
    if probes:
        cfg = load(cfg, probe_overrides(probes), manager=manager)
    inputs = prepare_inputs(image, mask, resize_mask=resize_mask)
    if pipe is None:
        pipe = load_pipeline(cfg)
    return run_probed(pipe, cfg, inputs, prompt, seed, recipe_label(recipe), manager=manager)


def load_compared(recipes: Sequence[str], overrides: Sequence[str], probes: Sequence[str],
                  manager: Any = None) -> list[DictConfig]:
    """The recipes of a comparison with the same overrides and probes; they must share one model."""
    loaded = [load_recipe(name, list(overrides) + probe_overrides(probes) if probes else list(overrides),
                          manager=manager) for name in recipes]
    models = [resolved(cfg)["model"] for cfg in loaded]
    if any(m != models[0] for m in models[1:]):
        raise ConfigError(
            f"--compare runs {' and '.join(recipes)} on one pipeline, but their model sections differ "
            f"({models[0]} vs {models[1]}); set the same model for both, e.g. model.pretrained=..."
        )
    return loaded
