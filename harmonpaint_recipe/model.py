"""Load the diffusers inpainting pipeline a recipe names (safetensors only)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from attnctl.errors import ConfigError, UnsupportedModelError
from harmonpaint_recipe.devices import dtype_keyword, resolve_device, resolve_dtype

TINY_MODELS = ("tiny", "tiny-sdxl")
#: the small model trained on the offline testbed world, shipped in the package
TESTBED_MODEL = "testbed"


_LOCAL_HINT = {
    False: "model.pretrained=/path/to/stable-diffusion-inpainting",
    True: "model.pretrained=/path/to/stable-diffusion-xl-1.0-inpainting-0.1",
}
def _build_tiny(name: str):
    print(
        f"note: model.pretrained={name} is a tiny random-weight model for smoke runs; its output is noise",
        file=sys.stderr,
    )
    from attnctl.testing import build_tiny_inpaint_pipeline

    return build_tiny_inpaint_pipeline(seed=0, kind="sdxl" if name == "tiny-sdxl" else "sd")


def _load_testbed():
    """The shipped testbed pipeline (``harmonpaint_recipe/testbed/weights``), loaded with
    ``from_pretrained`` from the package folder: safetensors only, never the hub."""
    from harmonpaint_recipe.testbed.models import load_testbed_pipeline

    return load_testbed_pipeline()


def is_sdxl_model(pretrained: str) -> bool:
    """Whether ``pretrained`` (hub id or local folder) names an SDXL pipeline."""
    index = Path(pretrained) / "model_index.json"
    if index.is_file():
        return "XL" in index.read_text(encoding="utf-8").split('"_class_name"', 1)[-1][:80]
    return "xl" in pretrained.lower()


def _hub_unreachable(pretrained: str, timeout: float = 3.0) -> bool:
    """True when the hub cannot be reached: then only the local cache is tried, at once.

    Without this check an offline machine spends half a minute in the hub client's retries
    before failing. ``HF_HUB_OFFLINE=1`` skips the check (the hub client is offline already).
    """
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return False
    except OSError:
        print(f"note: the Hugging Face hub is not reachable; looking for '{pretrained}' in the local cache only",
              file=sys.stderr)
        return True


def _from_pretrained(pretrained: str, model: Mapping[str, Any], dtype: torch.dtype):
    from diffusers import AutoPipelineForInpainting

    kwargs: dict[str, Any] = dict(use_safetensors=True)
    kwargs[dtype_keyword()] = dtype
    if model.get("variant"):
        kwargs["variant"] = model["variant"]
    if model.get("local_files_only"):
        kwargs["local_files_only"] = True
    local = Path(pretrained).expanduser()
    looks_local = pretrained.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "model_index.json").is_file():
        raise ConfigError(
            f"model.pretrained='{pretrained}' is not a diffusers pipeline folder (no model_index.json); "
            f"point it at a folder saved with save_pretrained, e.g. {_LOCAL_HINT[is_sdxl_model(pretrained)]}"
        )
    if not looks_local and not kwargs.get("local_files_only"):
        kwargs["local_files_only"] = _hub_unreachable(pretrained)
    try:
        return AutoPipelineForInpainting.from_pretrained(str(local) if looks_local else pretrained, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
        safetensors = "safetensors" in str(exc).lower()
        fix = (
            "attnctl loads safetensors weights only; convert the .bin/.ckpt weights to safetensors"
            if safetensors
            else "without internet access, download the model elsewhere and point the recipe at the local "
            f"folder, e.g. {_LOCAL_HINT[is_sdxl_model(pretrained)]} on the command line; with the model in the "
            "Hugging Face cache, HF_HUB_OFFLINE=1 or model.local_files_only=true loads it without asking the hub"
        )
        raise ConfigError(f"cannot load model '{pretrained}': {reason}. {fix}") from None


def load_pipeline(recipe: Any, device: str | None = None, dtype: str | None = None):
    """Load (or build) the inpainting pipeline of ``recipe`` and move it to its device.

    Args:
        recipe: a recipe name, path or ``DictConfig`` (see ``load_recipe``).
        device, dtype: override ``model.device`` / ``model.dtype``.

    Returns:
        A ``StableDiffusionInpaintPipeline`` or ``StableDiffusionXLInpaintPipeline``; reuse it
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
    if name in TINY_MODELS:
        pipe = _build_tiny(name)
    elif name == TESTBED_MODEL:
        pipe = _load_testbed()
    else:
        pipe = _from_pretrained(name, model, dt)
    check_pipeline(pipe)
    if pipe.unet.dtype != dt:  # tiny and testbed models load in fp32; hub models load in dt already
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
)


def check_pipeline(pipe: Any) -> None:
    """Refuse pipelines the runner cannot drive."""
    import diffusers

    classes = tuple(getattr(diffusers, name) for name in SUPPORTED_PIPELINES if hasattr(diffusers, name))
    if not isinstance(pipe, classes):
        raise UnsupportedModelError(
            f"{type(pipe).__name__} is not supported; the runner drives {', '.join(SUPPORTED_PIPELINES)}"
        )
