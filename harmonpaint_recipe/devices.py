"""Device and dtype names as users write them (``auto``, ``cpu``, ``cuda:1``, ``fp16``), resolved once.

Recipes (``model.device`` / ``model.dtype``), ``attnctl inpaint --device`` and ``attnctl bench``
all go through these functions, so ``auto`` means the same everywhere: CUDA when available,
fp16 on CUDA and fp32 elsewhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnctl.errors import ConfigError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("fp32", "fp16", "bf16")


def resolve_device(name: str, option: str = "model.device") -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cpu``, ``cuda``, ``cuda:N``. ``option`` names the setting in errors."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{option}: '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{option}: expected auto, cpu or cuda(:N), got '{name}'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name}, but no CUDA device is available here; use cpu (or auto)")
    return device


def resolve_dtype(name: str, device: torch.device, option: str = "model.dtype") -> torch.dtype:
    """``auto`` -> fp16 on CUDA, fp32 elsewhere; ``fp32``, ``fp16``, ``bf16``."""
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise ConfigError(f"{option}: expected auto, {', '.join(DTYPE_NAMES)}; got '{name}'")
    return getattr(torch, {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[name])


def dtype_keyword() -> str:
    """The ``from_pretrained`` keyword for the dtype: diffusers renamed ``torch_dtype`` to ``dtype``; use whichever this version takes (no warning)."""
    import importlib

    try:
        resolver = getattr(importlib.import_module("diffusers.utils.deprecation_utils"), "_resolve_dtype", None)
    except ImportError:
        resolver = None
    return "dtype" if resolver is not None else "torch_dtype"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``fp16`` (the name recipes and sidecars use)."""
    names = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}
    return names.get(str(dtype), str(dtype))


#: test-sized models: a CPU thread pool costs them more than it gains
SMALL_MODELS = ("tiny", "tiny-sdxl", "testbed")


def configure_threads(threads: int | str | None, model_id: str) -> int:
    """Set torch's CPU thread count for this process and return it.

    ``auto`` (or None): keep ``OMP_NUM_THREADS`` when it is set; otherwise 1 thread for the
    small test models (thread start-up and synchronisation cost them more than they gain:
    4x slower on 2 shared cores) and torch's own default for real models. An int: exactly
    that many. CPU results are bit-identical only with the same thread count, so sidecars
    record it and ``--from`` reuses it.
    """
    import os

    import torch

    if threads in (None, "auto"):
        if os.environ.get("OMP_NUM_THREADS"):
            return torch.get_num_threads()
        if str(model_id) not in SMALL_MODELS:
            return torch.get_num_threads()
        count = 1
    else:
        try:
            count = int(threads)
        except (TypeError, ValueError):
            raise ConfigError(f"--threads: expected a number of threads or auto, got {threads!r}") from None
        if count < 1:
            raise ConfigError(f"--threads must be at least 1, got {count}")
    torch.set_num_threads(count)
    return count
