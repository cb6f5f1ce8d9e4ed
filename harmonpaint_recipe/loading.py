"""Find, compose, override and validate recipes.

A recipe is a shipped name (``harmonpaint_recipe/recipes/<name>.yaml``) or a path to a
user's YAML file. A file may start from other recipes with ``defaults: [name-or-path, ...]``
(merged in order, then the file itself on top). Overrides are ``key=value`` strings
(OmegaConf dotlist: values are parsed as YAML) or a mapping of dotted keys to values.
Mappings merge key by key; lists are replaced wholesale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attnctl.errors import ConfigError, did_you_mean
from harmonpaint_recipe.schema import (
    RecipeConfig,
    check_instances,
    check_no_python,
    check_section,
    with_parameter_defaults,
)

RECIPE_DIR = Path(__file__).parent / "recipes"
Overrides = Iterable[str] | Mapping[str, Any] | None


def recipe_names() -> list[str]:
    """Names of the shipped recipes, sorted."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """The YAML file of a shipped recipe name or of a path; ``ConfigError`` if neither exists."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or candidate.parent != Path("."):
        if not candidate.is_file():
            raise ConfigError(f"recipe file '{text}' does not exist; give a shipped recipe name or a YAML path")
        return candidate
    shipped = RECIPE_DIR / f"{text}.yaml"
    if shipped.is_file():
        return shipped
    if candidate.is_file():
        return candidate
    names = recipe_names()
    raise ConfigError(
        f"unknown recipe '{text}'{did_you_mean(text, names)}; shipped recipes: {', '.join(names)} "
        "(or give the path of a YAML file; see `attnctl recipes`)"
    )


def _read_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(f"recipe file '{path}' is not valid YAML ({reason}); quote values with [ ] : such as 'self[-8:]'") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"recipe file '{path}' must hold a mapping at the top level, not a list")
    return cfg


def _compose(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read ``path`` and merge its ``defaults`` under it."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ConfigError(f"recipe defaults form a cycle: {chain}")
    cfg = _read_yaml(path)
    defaults = cfg.pop("defaults", None)
    if defaults is None:
        return cfg
    if isinstance(defaults, str):
        defaults = [defaults]
    if not OmegaConf.is_list(defaults) and not isinstance(defaults, list):
        raise ConfigError(f"{path}: 'defaults' must be a list of recipe names or paths, e.g. [harmonpaint]")
    bases = []
    for item in defaults:
        text = str(item)
        local = path.parent / text
        base_path = local if text.endswith((".yaml", ".yml")) and local.is_file() else recipe_path(text)
        bases.append(_compose(base_path, (*seen, path.resolve())))
    try:
        return OmegaConf.merge(*bases, cfg)
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot merge onto its defaults: {str(exc).splitlines()[0]}") from None


def _overrides_config(overrides: Overrides) -> DictConfig:
    """Turn ``key=value`` strings or a ``{dotted.key: value}`` mapping into a config."""
    if overrides is None:
        return OmegaConf.create({})
    if isinstance(overrides, Mapping):
        out = OmegaConf.create({})
        for key, value in overrides.items():
            OmegaConf.update(out, str(key), value, force_add=True)
        return out
    items = [overrides] if isinstance(overrides, str) else list(overrides)
    for item in items:
        if "=" not in str(item) or str(item).startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value, e.g. strategies.makvs.enabled=false")
    try:
        return OmegaConf.from_dotlist([str(i) for i in items])
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot parse overrides {items}: {exc}") from None


def validate_recipe(cfg: DictConfig, manager: Any = None) -> DictConfig:
    """Validate a composed recipe; return it merged onto the schema defaults.

    Interpolations (``${eta}``) are kept in the returned config, so later overrides of the
    shared value still reach every place that uses it.
    """
    raw = OmegaConf.to_container(cfg, resolve=False)
    check_no_python(raw)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"recipe interpolation failed: {exc}".splitlines()[0]) from None
    check_section(resolved, RecipeConfig, "")
    if manager is None:
        from attnctl.plugins import StrategyManager

        manager = StrategyManager.default()
    instances = check_instances(resolved, manager)
    out = OmegaConf.merge(OmegaConf.structured(RecipeConfig), cfg)
    # a plain (non-structured) config: users and tools may add keys while experimenting
    out = OmegaConf.create(OmegaConf.to_container(out, resolve=False))
    if instances:
        with_parameter_defaults(out, instances)
    return out


def load_recipe(name_or_path: str | Path | DictConfig | Mapping, overrides: Overrides = None, manager: Any = None) -> DictConfig:
    """Load a recipe by shipped name, YAML path, or from an existing config, and validate it.

    Args:
        name_or_path: ``"harmonpaint"``, ``"path/to/my.yaml"``, or a ``DictConfig``/mapping
            (e.g. a recipe loaded before, or the ``recipe`` of a sidecar JSON).
        overrides: ``["strategies.makvs.enabled=false", "sampler.steps=20"]`` or
            ``{"strategies.makvs.scale": 0.8}``.
        manager: strategy plugin manager used to validate strategy parameters
            (default: discovered from entry points).

    Returns:
        The validated recipe as an OmegaConf ``DictConfig`` (interpolations kept).

    Raises:
        ConfigError: unknown recipe, unknown key, wrong type, unknown strategy, bad override.
    """
    if isinstance(name_or_path, (DictConfig, Mapping)):
        cfg = OmegaConf.create(OmegaConf.to_container(name_or_path, resolve=False)
                               if isinstance(name_or_path, DictConfig) else dict(name_or_path))
        cfg.pop("defaults", None)
    else:
        cfg = _compose(recipe_path(name_or_path))
    try:
        cfg = OmegaConf.merge(cfg, _overrides_config(overrides))
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot apply overrides {overrides}: {str(exc).splitlines()[0]}") from None
    return validate_recipe(cfg, manager)


def resolved(recipe: DictConfig) -> dict:
    """The recipe as a plain dict with every interpolation resolved."""
    return OmegaConf.to_container(recipe, resolve=True)


def to_yaml(recipe: DictConfig) -> str:
    """The fully resolved recipe as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.create(resolved(recipe)))


def describe(name: str) -> str:
    """The one-line description of a shipped recipe (without validating it)."""
    cfg = _compose(recipe_path(name))
    return str(cfg.get("description", "") or "").strip().splitlines()[0] if cfg.get("description") else ""
