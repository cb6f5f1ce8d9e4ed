"""HarmonPaint recipes for attnctl: load a recipe, load a pipeline, inpaint.

Quick use::

    import harmonpaint_recipe as hp
    recipe = hp.load_recipe("harmonpaint", ["sampler.steps=30"])
    pipe = hp.load_pipeline(recipe)
    image = hp.inpaint("photo.png", "mask.png", "a cat", recipe=recipe, pipe=pipe, seed=0)
"""

from __future__ import annotations

from typing import Any

__all__ = ["inpaint", "load_pipeline", "load_recipe", "recipe_names"]


def __getattr__(name: str) -> Any:
    # lazy: importing the package (e.g. for the dataset tools) must not import diffusers
    if name == "load_recipe":
        from harmonpaint_recipe.loading import load_recipe

        return load_recipe
    if name == "recipe_names":
        from harmonpaint_recipe.loading import recipe_names

        return recipe_names
    if name == "load_pipeline":
        from harmonpaint_recipe.model import load_pipeline

        return load_pipeline
    if name == "inpaint":
        from harmonpaint_recipe.api import inpaint

        return inpaint
    raise AttributeError(f"module 'harmonpaint_recipe' has no attribute {name!r}")
