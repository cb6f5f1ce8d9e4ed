"""Where a command gets its model: one set of names and one offline rule for every command.

A model is named in one of three ways:

- a **built-in name**: an entry point of the group ``attnctl.models`` names a function that
  builds or loads the pipeline without the network (attnctl registers ``tiny`` and
  ``tiny-sdxl``, its application ``testbed``; other packages may add theirs);
- a **local folder** saved with ``save_pretrained`` (it must hold ``model_index.json``);
- a **Hugging Face hub id**, loaded through the hub cache.

The offline rule: with ``HF_HUB_OFFLINE=1``, or when the hub does not answer within three
seconds, a hub id is looked up in the local cache only, at once, instead of spending half a
minute in the hub client's retries. ``attnctl inpaint``, ``probe``, ``app``, ``eval`` and
``sites`` all load through here.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from attnctl.errors import ConfigError, PluginWarning, did_you_mean

ENTRY_POINT_GROUP = "attnctl.models"
#: seconds to wait for the hub before deciding it is unreachable
HUB_TIMEOUT_S = 3.0


def model_names() -> list[str]:
    """The built-in model names (entry points of ``attnctl.models``), in registration order."""
    names: list[str] = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in names:
            names.append(ep.name)
    return names


def named_model(name: str) -> Callable[[], Any] | None:
    """The function that makes built-in model ``name``, or None when no entry point has that name.

    A package whose entry point fails to load is reported (``PluginWarning``) and treated as
    absent, so a broken plugin never takes the other models down.
    """
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name != name:
            continue
        try:
            return ep.load()
        except Exception as exc:
            dist = ep.dist.name if ep.dist is not None else "an unknown package"
            warnings.warn(f"attnctl: model '{name}' ({ep.value}, from {dist}) failed to load: "
                          f"{type(exc).__name__}: {exc}".splitlines()[0], PluginWarning, stacklevel=2)
            return None
    return None


def hub_unreachable(pretrained: str, timeout: float = HUB_TIMEOUT_S) -> bool:
    """True when only the local cache should be asked for ``pretrained``: ``HF_HUB_OFFLINE``
    is set, or the hub does not accept a connection within ``timeout`` seconds (said on stderr)."""
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


def looks_local(pretrained: str) -> bool:
    """Whether ``pretrained`` names a folder on this machine rather than a hub id."""
    return pretrained.startswith((".", "/", "~")) or Path(pretrained).expanduser().exists()


def pretrained_source(pretrained: str, local_files_only: bool = False, example: str = "/path/to/model",
                      option: str = "") -> tuple[str, bool]:
    """``(what to pass to from_pretrained, local_files_only)`` for a folder or hub id.

    Args:
        pretrained: a local pipeline folder or a hub id (built-in names are not handled here).
        local_files_only: never ask the hub; otherwise the offline rule decides.
        example: how this command is given a local folder, for the error message.
        option: the option or key that named the model (``model.pretrained=``), for the message.

    Raises:
        ConfigError: a local path that is not a diffusers pipeline folder.
    """
    if looks_local(pretrained):
        folder = Path(pretrained).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ConfigError(
                f"{option}'{pretrained}' is not a diffusers pipeline folder (no model_index.json); point it at a "
                f"folder saved with save_pretrained, e.g. {example}"
            )
        return str(folder), True
    return pretrained, bool(local_files_only) or hub_unreachable(pretrained)


def load_failure(pretrained: str, exc: BaseException, example: str, cache_hint: str = "HF_HUB_OFFLINE=1") -> ConfigError:
    """The error for a folder or hub id that could not be loaded, with the ways out.

    Args:
        example: how this command is given a local folder (``model.pretrained=/path/...``).
        cache_hint: how this command is told to use the hub cache only.
    """
    text = str(exc).strip()
    reason = text.splitlines()[0].rstrip(".") if text else type(exc).__name__
    names = model_names()
    guess = did_you_mean(pretrained, names) if "/" not in pretrained else ""
    if "safetensors" in text.lower():
        fix = "attnctl loads safetensors weights only; convert the .bin/.ckpt weights to safetensors"
    else:
        fix = (f"Without internet access, download the model elsewhere and point at its local folder, e.g. {example}; "
               f"with the model in the Hugging Face cache, {cache_hint} loads it without asking the hub; "
               f"built-in models: {', '.join(names)}")
    return ConfigError(f"cannot load model '{pretrained}'{guess}: {reason}. {fix}")
