"""Table III variants derived from a recipe's strategies.

Components are the entries of ``recipe.strategies`` that are enabled in the recipe and are
not gates (strategy type ``timestep_gate`` only schedules the others). For components
``c1..cn`` in recipe order the variants are: ``none`` (all off), the cumulative ``+c1``,
``+c1+c2``, ..., ``full`` (all on), then each leave-one-out ``full-ci`` not already listed.
Every variant sets ``strategies.<c>.enabled`` explicitly for every component.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from attnctl.errors import ConfigError
from harmonpaint_recipe.evaluation.methods import Method

GATE_TYPES = frozenset({"timestep_gate"})


def ablation_components(strategies: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Names of the ablatable components, in recipe order."""
    return [
        name for name, spec in strategies.items()
        if spec.get("strategy") not in GATE_TYPES and bool(spec.get("enabled", True))
    ]


def ablation_variants(components: list[str]) -> list[tuple[str, frozenset[str]]]:
    """``[(variant name, enabled components)]`` as described in the module docstring."""
    if not components:
        raise ConfigError("the recipe has no enabled strategy besides gates; there is nothing to ablate")
    variants: list[tuple[str, frozenset[str]]] = [("none", frozenset())]
    for k in range(1, len(components) + 1):
        name = "full" if k == len(components) else "+" + "+".join(components[:k])
        variants.append((name, frozenset(components[:k])))
    seen = {v for _, v in variants}
    for c in components:
        enabled = frozenset(components) - {c}
        if enabled not in seen:
            variants.append((f"full-{c}", enabled))
            seen.add(enabled)
    return variants


def ablation_methods(
    recipe: str, overrides: list[str], load_recipe: Callable[[str, list[str]], Any] | None = None
) -> list[Method]:
    """One :class:`Method` per variant of ``recipe`` (with the user's ``overrides`` first)."""
    if load_recipe is None:
        import harmonpaint_recipe as hr

        load_recipe = hr.load_recipe
    cfg = load_recipe(recipe, list(overrides))
    strategies = cfg["strategies"]
    components = ablation_components({k: dict(v) for k, v in strategies.items()})
    methods = []
    for name, enabled in ablation_variants(components):
        switches = tuple(f"strategies.{c}.enabled={'true' if c in enabled else 'false'}" for c in components)
        methods.append(Method(name=name, recipe=recipe, overrides=tuple(overrides) + switches, meta={"enabled": sorted(enabled)}))
    return methods
