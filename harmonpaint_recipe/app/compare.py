"""Compare modes: which two configurations one click runs, on the same seed.

- ``stock``: the recipe with every strategy instance off (plain Stable Diffusion
  inpainting, the ``sdi`` baseline of this recipe's sampler) against the recipe;
- ``one_off``: the recipe against the recipe with one chosen strategy instance off;
- ``single``: the recipe alone (half the time; nothing to compare).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from attnctl.errors import InputError

#: mode id -> label on the page, in display order
MODES: dict[str, str] = {
    "stock": "stock (no attention control) vs recipe",
    "one_off": "recipe vs recipe with one strategy off",
    "single": "recipe only",
}
DEFAULT_MODE = "stock"


@dataclass(frozen=True)
class Variant:
    """One configuration of a comparison.

    Attributes:
        slot: ``"A"`` (left) or ``"B"`` (right).
        label: what the page and the file names call it (``stock``, ``harmonpaint``).
        overrides: dotted key -> value, applied on top of the effective recipe.
    """

    slot: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def file_stem(self) -> str:
        """``B-harmonpaint-without-makvs``: safe in file names."""
        return f"{self.slot}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", self.label).strip("-")


def enabled_instances(recipe: Mapping[str, Any]) -> list[str]:
    """Strategy instances of ``recipe`` (resolved dict) that are switched on."""
    return [name for name, settings in (recipe.get("strategies") or {}).items()
            if (settings or {}).get("enabled", True)]


def variants(mode: str, recipe_label: str, recipe: Mapping[str, Any], off_instance: str | None = None) -> list[Variant]:
    """The configurations ``mode`` runs, left to right.

    Args:
        mode: a key of ``MODES``.
        recipe_label: name shown for the recipe itself.
        recipe: the effective recipe (resolved dict).
        off_instance: for ``one_off``, the enabled instance to switch off in B.

    Raises:
        InputError: unknown mode, or ``one_off`` without an enabled instance to switch off.
    """
    if mode == "stock":
        all_off = {f"strategies.{name}.enabled": False for name in (recipe.get("strategies") or {})}
        return [Variant("A", "stock", all_off), Variant("B", recipe_label)]
    if mode == "one_off":
        enabled = enabled_instances(recipe)
        if off_instance not in enabled:
            choices = ", ".join(enabled) or "none: every strategy is already off"
            raise InputError(
                f"compare mode '{MODES['one_off']}' needs the strategy to switch off in B; "
                f"pick one of the enabled ones ({choices})"
            )
        return [Variant("A", recipe_label), Variant("B", f"{recipe_label} without {off_instance}",
                                                    {f"strategies.{off_instance}.enabled": False})]
    if mode == "single":
        return [Variant("B", recipe_label)]
    raise InputError(f"unknown compare mode '{mode}'; use one of {', '.join(MODES)}")
