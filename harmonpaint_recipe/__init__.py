"""HarmonPaint recipes for attnctl: load a recipe, load a pipeline, inpaint.

Quick use::

    import harmonpaint_recipe as hp
    recipe = hp.load_recipe("harmonpaint", ["sampler.steps=30"])
    pipe = hp.load_pipeline(recipe)
    image = hp.inpaint("photo.png", "mask.png", "a cat", recipe=recipe, pipe=pipe, seed=0)
    probed = hp.probe("photo.png", "mask.png", "a cat", recipe=recipe, pipe=pipe, seed=0)  # + attention probes
"""

from __future__ import annotations

from attnctl.lazy import lazy_exports

_EXPORTS = {
    "load_recipe": "harmonpaint_recipe.loading",
    "recipe_names": "harmonpaint_recipe.loading",
    "load_pipeline": "harmonpaint_recipe.model",
    "inpaint": "harmonpaint_recipe.api",
    "probe": "harmonpaint_recipe.probing.run",
}
__all__ = sorted(_EXPORTS)
# lazy: importing the package (e.g. for the dataset tools) must not import diffusers
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
