"""Load the diffusers inpainting pipeline a recipe names (safetensors only)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

import torch

from attnctl.errors import ConfigError, UnsupportedModelError

TINY_MODELS = ("tiny", "tiny-sdxl")
#: the small model trained on the offline testbed world, shipped in the package
TESTBED_MODEL = "testbed"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_LOCAL_HINT = {
    False: "model.pretrained=/path/to/stable-diffusion-inpainting",
    True: "model.pretrained=/path/to/stable-diffusion-xl-1.0-inpainting-0.1",
}


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("model.device=cuda, but no CUDA device is available; use --device cpu (or auto)")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"model.device: expected auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> fp16 on CUDA, fp32 on CPU."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype: expected auto, fp32, fp16 or bf16, got {dtype!r}")
    return _DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}.get(dtype, str(dtype))


def _build_tiny(name: str):
    print(
        f"note: model.pretrained={name} is a tiny random-weight model for smoke runs; its output is noise",
        file=sys.stderr,
    )
    if name == "tiny":
        from attnctl.tiny import build_tiny_inpaint_pipeline

        pipe = build_tiny_inpaint_pipeline(seed=0)
    else:
        from attnctl.tiny_sdxl import build_tiny_sdxl_inpaint_pipeline

        pipe = build_tiny_sdxl_inpaint_pipeline(seed=0)
    return pipe


def _load_testbed():
    """The shipped testbed pipeline (``harmonpaint_recipe/testbed/weights``), loaded with
    ``from_pretrained`` from the package folder: safetensors only, never the hub."""
    from harmonpaint_recipe.testbed.models import load_testbed_pipeline

    return load_testbed_pipeline()


def _is_sdxl(pretrained: str) -> bool:
    index = Path(pretrained) / "model_index.json"
    if index.is_file():
        return "XL" in index.read_text(encoding="utf-8").split('"_class_name"', 1)[-1][:80]
    return "xl" in pretrained.lower()


def _from_pretrained(pretrained: str, model: Mapping[str, Any], dtype: torch.dtype):
    from diffusers import AutoPipelineForInpainting

    kwargs: dict[str, Any] = dict(torch_dtype=dtype, use_safetensors=True)
    if model.get("variant"):
        kwargs["variant"] = model["variant"]
    if model.get("local_files_only"):
        kwargs["local_files_only"] = True
    local = Path(pretrained).expanduser()
    looks_local = pretrained.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "model_index.json").is_file():
        raise ConfigError(
            f"model.pretrained='{pretrained}' is not a diffusers pipeline folder (no model_index.json); "
            f"point it at a folder saved with save_pretrained, e.g. {_LOCAL_HINT[_is_sdxl(pretrained)]}"
        )
    try:
        return AutoPipelineForInpainting.from_pretrained(str(local) if looks_local else pretrained, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        safetensors = "safetensors" in str(exc).lower()
        fix = (
            "attnctl loads safetensors weights only; convert the .bin/.ckpt weights to safetensors"
            if safetensors
            else "without internet access, download the model elsewhere and point the recipe at the local "
            f"folder, e.g. {_LOCAL_HINT[_is_sdxl(pretrained)]} on the command line"
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


def check_pipeline(pipe: Any) -> None:
    """Refuse pipelines the runner cannot drive."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    if not isinstance(pipe, (StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline)):
        raise UnsupportedModelError(
            f"{type(pipe).__name__} is not supported; the runner drives StableDiffusionInpaintPipeline "
            "(SD 1.x/2.x) and StableDiffusionXLInpaintPipeline (SDXL)"
        )
