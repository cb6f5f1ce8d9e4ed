"""The Python API: ``inpaint(image, mask, prompt, recipe=..., pipe=..., seed=...)``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig
from PIL import Image

from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe


def keyword_overrides(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``strategies__makvs__scale=0.8`` -> ``{"strategies.makvs.scale": 0.8}``."""
    return {key.replace("__", "."): value for key, value in kwargs.items()}


def inpaint(
    image: str | Path | Image.Image,
    mask: str | Path | Image.Image,
    prompt: str,
    recipe: str | Path | DictConfig = "harmonpaint",
    pipe: Any = None,
    seed: int | None = None,
    overrides: Iterable[str] | Mapping[str, Any] | None = None,
    resize_mask: bool = False,
    manager: Any = None,
    pipeline_kwargs: Mapping[str, Any] | None = None,
    adapters: Mapping[Any, Any] | None = None,
    **kwargs: Any,
) -> Image.Image:
    """Inpaint the white region of ``mask`` in ``image`` following ``prompt``.

    Args:
        image: path or PIL image (sides multiples of 8).
        mask: path or PIL image, white = region to inpaint (binarized at 0.5).
        prompt: text prompt for the inpainted region.
        recipe: shipped recipe name, YAML path, or a recipe from ``load_recipe``.
        pipe: a pipeline from ``load_pipeline`` to reuse (default: load the recipe's model;
            loading is slow, so pass one when making several images).
        seed: noise seed (default: a random one).
        overrides: ``["strategies.makvs.enabled=false"]`` or ``{"sampler.steps": 20}``.
        resize_mask: resize a mask of another size to the image instead of failing.
        manager: strategy plugin manager (default: entry points).
        pipeline_kwargs: extra arguments of the pipeline call (``control_image``,
            ``ip_adapter_image``, ``pag_scale``, ``cross_attention_kwargs``, ...).
        adapters: processor adapters for attention processors of your own (``attnctl.attach``).
        **kwargs: more overrides, dots written as ``__``: ``strategies__makvs__scale=0.8``.

    Returns:
        The inpainted PIL image.
    """
    from harmonpaint_recipe.model import load_pipeline
    from harmonpaint_recipe.runner import Runner

    cfg = load_recipe(recipe, overrides, manager=manager)
    if kwargs:  # keyword overrides apply on top of ``overrides``
        cfg = load_recipe(cfg, keyword_overrides(kwargs), manager=manager)
    inputs = prepare_inputs(image, mask, resize_mask=resize_mask)
    if pipe is None:
        pipe = load_pipeline(cfg)
    with Runner(pipe, cfg, manager=manager, adapters=adapters) as runner:
        return runner(inputs, prompt, seed, pipeline_kwargs=dict(pipeline_kwargs or {})).image
