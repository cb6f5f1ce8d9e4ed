"""Structured schema of a recipe, and the checks that turn a raw YAML tree into one.

The schema is a set of dataclasses (OmegaConf structured configs supply the defaults).
Validation is done here rather than by OmegaConf so that every error names the key,
suggests the closest valid one and says which type was expected. Strategy parameters
are validated against each strategy's own params dataclass (``attnctl.params``), probe
settings (the ``probes`` section, same form, off unless ``enabled: true``) likewise.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

from attnctl.errors import ConfigError, did_you_mean
from attnctl.params import check_type

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "fp16", "bf16")
SCHEDULERS = ("ddim", "pipeline")
#: keys that would let a YAML file instantiate arbitrary Python objects elsewhere
FORBIDDEN_KEYS = ("_target_", "_partial_", "_recursive_", "_args_")


@dataclass
class ModelConfig:
    """Which pipeline to load and where it runs."""

    pretrained: str = field(
        default="stable-diffusion-v1-5/stable-diffusion-inpainting",
        metadata={"help": "hub id, local folder, 'testbed' (the small model trained on the offline testbed world), or 'tiny' / 'tiny-sdxl' (random smoke-test models)"},
    )
    variant: Optional[str] = field(default=None, metadata={"help": "weights variant, e.g. 'fp16'"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda", "choices": DEVICES})
    dtype: str = field(default="auto", metadata={"help": "auto | fp32 | fp16 | bf16", "choices": DTYPES})
    local_files_only: bool = field(default=False, metadata={"help": "never contact the hub"})


@dataclass
class SamplerConfig:
    """Sampling settings of the diffusers pipeline call."""

    scheduler: str = field(default="ddim", metadata={"help": "ddim | pipeline", "choices": SCHEDULERS})
    steps: int = field(default=50, metadata={"help": "number of inference steps"})
    guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance scale (CFG iff > 1)"})
    strength: float = field(default=1.0, metadata={"help": "how much of the masked region is re-noised (1 = all)"})
    negative_prompt: Optional[str] = field(default=None, metadata={"help": "negative prompt"})
    positive_prompt: Optional[str] = field(
        default=None,
        metadata={"help": "words appended to every prompt after ', ' (HD-Painter's quality words); not part of "
                          "the prompt's own tokens that strategies read"},
    )


@dataclass
class OutputConfig:
    """What happens to the pipeline's image before it is handed back."""

    paste_back: bool = field(
        default=False,
        metadata={"help": "composite the input image back outside the mask, with a soft edge (as inpainting tools' "
                          "'only masked' mode and diffusers' apply_overlay do); off in the paper's recipes"},
    )
    paste_blur: float = field(
        default=2.0,
        metadata={"help": "paste_back's soft edge outside the mask: Gaussian sigma in pixels (0: hard edge)", "min": 0.0},
    )


@dataclass
class RecipeConfig:
    """A whole recipe."""

    description: str = field(default="", metadata={"help": "one line shown by `attnctl recipes`"})
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    eta: float = field(default=0.6, metadata={"help": "phase boundary on t / T_train (Sec. IV-C)"})
    strategies: Dict[str, Any] = field(default_factory=dict, metadata={"help": "instance name -> strategy settings"})
    probes: Dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "instance name -> probe settings (off unless enabled: true; see docs/probes.md)"},
    )


def check_no_python(tree: Any, where: str = "") -> None:
    """Refuse keys that mean 'instantiate this Python object' in other tools."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            path = f"{where}.{key}" if where else str(key)
            if key in FORBIDDEN_KEYS:
                raise ConfigError(
                    f"recipe key '{path}' is not allowed: recipes cannot import or run Python. "
                    "Strategies are picked by name with 'strategy: <name>' (see `attnctl strategies`)"
                )
            check_no_python(value, path)
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            check_no_python(value, f"{where}[{i}]")


def check_section(tree: Any, schema: type, where: str) -> None:
    """Check a resolved mapping against a schema dataclass (recursively)."""
    label = where or "the recipe"
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{label}: expected a mapping of keys to values, got {type(tree).__name__} {tree!r}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in tree.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown recipe key '{path}'{did_you_mean(str(key), fields)}; "
                f"valid keys{' of ' + where if where else ''}: {', '.join(fields)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            check_section(value, tp, path)
            continue
        if tp == Dict[str, Any]:
            if not isinstance(value, Mapping):
                kind = "a list" if isinstance(value, (list, tuple)) else type(value).__name__
                raise ConfigError(f"{path}: expected a mapping of instance name -> settings, got {kind}")
            continue
        check_type(value, tp, path)
        choices = fields[key].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{path}: expected one of {', '.join(choices)}, got {value!r}")
        least = fields[key].metadata.get("min")
        if least is not None and value < least:
            raise ConfigError(f"{path}: must be at least {least:g}, got {value!r}")


def check_instances(recipe: Mapping[str, Any], manager: Any) -> list:
    """Validate every strategy and probe instance against its plugin's params dataclass (the engine's own check)."""
    from attnctl.planning import resolve_all

    return resolve_all({"strategies": recipe.get("strategies") or {}, "probes": recipe.get("probes") or {}}, manager)


def with_parameter_defaults(recipe: Any, instances: list) -> None:
    """Write every parameter a run will use into ``recipe`` (a DictConfig), in place.

    Keys the recipe sets stay as they are (interpolations included); missing ones get the
    strategy's default, so a shown recipe or a sidecar lists the complete configuration.
    """
    for instance in instances:
        node = recipe[instance.section][instance.name]
        defaults = {"strategy": instance.spec.name, "enabled": instance.enabled}
        defaults.update({f.name: _plain(getattr(instance.params, f.name)) for f in dataclasses.fields(instance.params)})
        for key, value in defaults.items():
            if key not in node:
                node[key] = value


def _plain(value: Any) -> Any:
    """Tuples as lists (YAML has no tuple), recursively."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
