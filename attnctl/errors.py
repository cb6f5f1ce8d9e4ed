"""Exceptions raised for bad input. Every message names the input and the fix."""

from __future__ import annotations

import difflib
from typing import Iterable


class AttnctlError(Exception):
    """Base class of every error attnctl raises on purpose (bad input, bad config)."""


class ConfigError(AttnctlError, ValueError):
    """A strategy or recipe configuration is invalid."""


class SelectorError(ConfigError):
    """A site selector is malformed or matches no site."""


class UnsupportedModelError(AttnctlError, TypeError):
    """The pipeline or model is not one attnctl can attach to."""


class ProcessorReplacedError(AttnctlError, RuntimeError):
    """Someone replaced attnctl's processors after attach."""


class InputError(AttnctlError, ValueError):
    """A user input (image, mask, path, prompt) is invalid."""


class RunError(AttnctlError, RuntimeError):
    """A run cannot go on as planned (a run nested in a run, a step the schedule does not know,
    a site that got other tokens than its grid)."""


class UnsupportedProcessorError(ConfigError):
    """A strategy acts at a site whose attention processor attnctl has no adapter for."""


class PluginWarning(UserWarning):
    """A strategy plugin could not be loaded; the others keep working."""


class RunWarning(UserWarning):
    """Something in a run did not happen as planned (a strategy that never acted, a site never run)."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""
