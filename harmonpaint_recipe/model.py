"""Load the diffusers inpainting pipeline a recipe names (safetensors only).

``model.pretrained`` is a built-in name (``tiny``, ``tiny-sdxl``, ``testbed``: entry points
of ``attnctl.models``), a local folder or a hub id; ``attnctl.models`` holds the names and
the offline rule every command shares.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from attnctl.backbones import denoiser_of
from attnctl.errors import UnsupportedModelError
from attnctl.models import load_failure, named_model, pretrained_source
from harmonpaint_recipe.devices import dtype_keyword, resolve_device, resolve_dtype

#: built-in models whose weights are random: their output is noise
TINY_MODELS = ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux-fill")
#: the small model trained on the offline testbed world, shipped in the package
TESTBED_MODEL = "testbed"


_LOCAL_HINT = {
    False: "model.pretrained=/path/to/stable-diffusion-inpainting",
    True: "model.pretrained=/path/to/stable-diffusion-xl-1.0-inpainting-0.1",
}
_CACHE_HINT = "HF_HUB_OFFLINE=1 or model.local_files_only=true"


def _saved_class(source: str) -> str | None:
    """The pipeline class a local folder was saved as (its model_index.json), or None."""
    import json

    index = Path(source) / "model_index.json"
    try:
        return json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return None


def model_family(pretrained: str) -> str:
    """``sd``, ``sdxl``, ``sd3`` or ``flux`` for a hub id, local folder or built-in name (its saved
    pipeline class where there is one, else its name)."""
    return family_of_name(_saved_class(pretrained) or pretrained)


def family_of_name(name: str) -> str:
    """The model family a pipeline class or model name speaks of (``FluxFillPipeline`` -> ``flux``)."""
    lowered = name.lower()
    if "flux" in lowered:
        return "flux"
    if "sd3" in lowered or "diffusion3" in lowered or "diffusion-3" in lowered:
        return "sd3"
    return "sdxl" if "xl" in lowered else "sd"


def _from_pretrained(pretrained: str, model: Mapping[str, Any], dtype: torch.dtype):
    """A local folder or hub id, through the engine's offline rule (``attnctl.models``)."""
    from diffusers import AutoPipelineForInpainting, DiffusionPipeline

    hint = _LOCAL_HINT[model_family(pretrained) == "sdxl"]
    source, local_only = pretrained_source(pretrained, bool(model.get("local_files_only")), example=hint,
                                          option="model.pretrained=")
    kwargs: dict[str, Any] = dict(use_safetensors=True, local_files_only=local_only)
    kwargs[dtype_keyword()] = dtype
    if model.get("variant"):
        kwargs["variant"] = model["variant"]
    # transformer inpainting pipelines load as the class they were saved as (the auto class maps
    # a FLUX repository to FluxInpaintPipeline, not to FLUX Fill's)
    loader = DiffusionPipeline if _saved_class(source) in TRANSFORMER_PIPELINES else AutoPipelineForInpainting
    try:
        return loader.from_pretrained(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise load_failure(pretrained, exc, example=hint, cache_hint=_CACHE_HINT) from None


def load_pipeline(recipe: Any, device: str | None = None, dtype: str | None = None):
    """Load (or build) the inpainting pipeline of ``recipe`` and move it to its device.

    Args:
        recipe: a recipe name, path or ``DictConfig`` (see ``load_recipe``).
        device, dtype: override ``model.device`` / ``model.dtype``.

    Returns:
        One of ``SUPPORTED_PIPELINES`` (SD, SDXL, SD3 inpainting, FLUX Fill); reuse it
        across ``inpaint(..., pipe=pipe)`` calls.

    Raises:
        ConfigError: the model cannot be loaded (message says how to use a local folder).
        UnsupportedModelError: the model is not an SD/SDXL inpainting pipeline.
    """
    from harmonpaint_recipe.loading import load_recipe

    if not hasattr(recipe, "model"):
        recipe = load_recipe(recipe)
    model = recipe.model
    dev = resolve_device(device or model.device)
    dt = resolve_dtype(dtype or model.dtype, dev)
    name = str(model.pretrained)
    make = named_model(name)
    if make is not None:
        if name in TINY_MODELS:
            print(f"note: model.pretrained={name} is a tiny random-weight model for smoke runs; its output is noise",
                  file=sys.stderr)
        pipe = make()
    else:
        pipe = _from_pretrained(name, model, dt)
    check_pipeline(pipe)
    if denoiser_of(pipe).dtype != dt:  # built-in models load in fp32; hub models load in dt already
        pipe = pipe.to(dtype=dt)
    pipe = pipe.to(dev)
    pipe._attnctl_model_id = name  # recorded in sidecars
    return pipe


#: inpainting pipelines the runner drives: SD 1.x/2.x and SDXL, plain, with ControlNet, with PAG
SUPPORTED_PIPELINES = (
    "StableDiffusionInpaintPipeline",
    "StableDiffusionXLInpaintPipeline",
    "StableDiffusionControlNetInpaintPipeline",
    "StableDiffusionXLControlNetInpaintPipeline",
    "StableDiffusionPAGInpaintPipeline",
    "StableDiffusionXLPAGInpaintPipeline",
    "StableDiffusion3InpaintPipeline",
    "FluxFillPipeline",
)
#: the supported pipelines whose network is a transformer (``attnctl.backbones``)
TRANSFORMER_PIPELINES = ("StableDiffusion3InpaintPipeline", "FluxFillPipeline")


def check_pipeline(pipe: Any) -> None:
    """Refuse pipelines the runner cannot drive."""
    import diffusers

    classes = tuple(getattr(diffusers, name) for name in SUPPORTED_PIPELINES if hasattr(diffusers, name))
    if not isinstance(pipe, classes):
        raise UnsupportedModelError(
            f"{type(pipe).__name__} is not supported; the runner drives {', '.join(SUPPORTED_PIPELINES)}"
        )
