"""Half-precision parity: every recipe's final latents in fp16 and bf16 against fp32.

For each dtype the pipeline is built anew from the same seed (same random weights, cast),
and every recipe runs on it with the same inputs, prompt and noise, ``steps`` DDIM steps
with classifier-free guidance. The pipeline stops before the VAE decoder
(``output_type="latent"``); the final latents of each half dtype are compared with
fp32's: max and mean absolute difference, and the mean difference relative to the mean
absolute fp32 latent. Every step's latents are checked for NaN/inf and the first step
that is not finite is recorded (the steer loss's gradient and MAKVS's ``log`` bias are
where half precision is most likely to overflow).

Random weights amplify rounding differently from trained ones, so the absolute numbers
say little on their own; the ``sdi`` row (no attention control: stock diffusers) is the
yardstick the recipes are read against.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from attnctl.errors import ConfigError
from attnctl.layout import BatchLayout
from harmonpaint_recipe.bench.archs import ARCHITECTURES, build_pipeline
from harmonpaint_recipe.bench.harness import PROMPT, device_name, make_inputs
from harmonpaint_recipe.devices import DTYPE_NAMES, resolve_device, resolve_dtype

PARITY_RECIPES: tuple[str, ...] = ("sdi", "harmonpaint-sams", "harmonpaint-sams-steer", "harmonpaint")
HALF_DTYPES: tuple[str, ...] = ("fp16", "bf16")


@dataclass
class ParityConfig:
    """Settings of one parity run.

    Attributes:
        arch: benchmark architecture (``harmonpaint_recipe.bench.archs``).
        size: image side in pixels (``None``: the architecture's).
        steps: DDIM steps.
        recipes: recipes to compare (each attached through the runner).
        dtypes: half dtypes compared with fp32.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        seed: weights, inputs and noise seed.
        guidance_scale: CFG scale.
    """

    arch: str = "sd15-inpaint"
    size: int | None = None
    steps: int = 10
    recipes: tuple[str, ...] = PARITY_RECIPES
    dtypes: tuple[str, ...] = HALF_DTYPES
    device: str = "auto"
    seed: int = 0
    guidance_scale: float = 7.5

    def check(self) -> None:
        """Raise ``ConfigError`` naming the bad setting."""
        if self.steps < 1:
            raise ConfigError(f"parity steps must be at least 1, got {self.steps}")
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise ConfigError(f"parity size must be a positive multiple of 8 (VAE factor), got {self.size}")
        bad = [d for d in self.dtypes if d not in DTYPE_NAMES or d == "fp32"]
        if bad or not self.dtypes:
            raise ConfigError(f"parity dtypes must be a non-empty list of fp16, bf16; got {list(self.dtypes)}")
        if not self.recipes:
            raise ConfigError("parity needs at least one recipe, e.g. sdi,harmonpaint")


@dataclass
class _Run:
    latents: torch.Tensor  # final latents, fp32 on the CPU
    first_nonfinite_step: int | None
    seconds: float


def _run_recipe(pipe: Any, recipe: str, call_kwargs: Callable[[], dict], mask: torch.Tensor,
                layout: BatchLayout, device: torch.device) -> _Run:
    from harmonpaint_recipe.loading import load_recipe
    from harmonpaint_recipe.runner import Runner, prompt_token_indices

    nonfinite: list[int] = []

    def check_step(_pipe, step: int, _t, tensors: dict) -> dict:
        if not nonfinite and not bool(torch.isfinite(tensors["latents"]).all()):
            nonfinite.append(step)
        return tensors

    runner = Runner(pipe, load_recipe(recipe))
    tokens = [prompt_token_indices(pipe.tokenizer, PROMPT)]
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with runner.controller.run(layout, mask=mask, token_indices=tokens):
            latents = pipe(**call_kwargs(), output_type="latent", callback_on_step_end=check_step,
                           callback_on_step_end_tensor_inputs=["latents"]).images
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        runner.close()
    return _Run(latents.detach().float().cpu(), nonfinite[0] if nonfinite else None, seconds)


def _compare(half: _Run, full: _Run) -> dict[str, Any]:
    finite = half.first_nonfinite_step is None and bool(torch.isfinite(half.latents).all())
    row: dict[str, Any] = {"finite": finite, "first_nonfinite_step": half.first_nonfinite_step,
                           "seconds": round(half.seconds, 4)}
    if finite and full.first_nonfinite_step is None:
        diff = (half.latents - full.latents).abs()
        scale = float(full.latents.abs().mean())
        row.update(max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                   rel_mean_abs_diff=float(diff.mean()) / scale if scale > 0 else None)
    else:
        row.update(max_abs_diff=None, mean_abs_diff=None, rel_mean_abs_diff=None)
    return row


def run_parity(cfg: ParityConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every recipe in fp32 and each half dtype; return the record ``parity.json`` holds."""
    cfg.check()
    arch = ARCHITECTURES.get(cfg.arch, "--arch")
    device = resolve_device(cfg.device, option="--device")
    size = cfg.size or arch.default_size
    image, mask_image, mask = make_inputs(size, cfg.seed)
    layout = BatchLayout.for_pipeline(num_prompts=1, cfg=cfg.guidance_scale > 1.0)

    def call_kwargs() -> dict[str, Any]:
        return dict(prompt=PROMPT, image=image, mask_image=mask_image, height=size, width=size,
                    num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, strength=1.0,
                    generator=torch.Generator(device="cpu").manual_seed(cfg.seed))

    runs: dict[str, dict[str, _Run]] = {r: {} for r in cfg.recipes}
    for dtype_name in ("fp32", *cfg.dtypes):
        log(f"parity: building {arch.name} in {dtype_name} on {device} ...")
        pipe = build_pipeline(arch, cfg.seed, device, resolve_dtype(dtype_name, device, option="--dtype"))
        pipe.set_progress_bar_config(disable=True)
        for recipe in cfg.recipes:
            run = _run_recipe(pipe, recipe, call_kwargs, mask, layout, device)
            runs[recipe][dtype_name] = run
            state = "finite" if run.first_nonfinite_step is None else f"NOT FINITE from step {run.first_nonfinite_step}"
            log(f"parity: {recipe:<24} {dtype_name}  {run.seconds:7.2f} s  {state}")
        del pipe
        if device.type == "cuda":
            torch.cuda.empty_cache()

    recipes: dict[str, dict[str, Any]] = {}
    for recipe, by_dtype in runs.items():
        full = by_dtype["fp32"]
        recipes[recipe] = {
            "fp32": {"finite": full.first_nonfinite_step is None, "first_nonfinite_step": full.first_nonfinite_step,
                     "seconds": round(full.seconds, 4), "mean_abs_latent": float(full.latents.abs().mean())},
            **{d: _compare(by_dtype[d], full) for d in cfg.dtypes},
        }

    import diffusers

    meta = {
        "config": {**asdict(cfg), "recipes": list(cfg.recipes), "dtypes": list(cfg.dtypes), "size": size,
                   "device": str(device)},
        "arch": {"name": arch.name, "description": arch.description, "full_size": arch.full_size},
        "device": device_name(device),
        "latent_shape": list(runs[cfg.recipes[0]]["fp32"].latents.shape),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return {"meta": meta, "recipes": recipes}


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def parity_table(result: dict[str, Any]) -> str:
    """Markdown: one row per recipe and half dtype, with the drift relative to ``sdi``'s."""
    meta, cfg = result["meta"], result["meta"]["config"]
    lines = [
        f"`{meta['arch']['name']}`, {cfg['size']}x{cfg['size']}, {cfg['steps']} DDIM steps, CFG {cfg['guidance_scale']}, "
        f"seed {cfg['seed']}, {meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}; "
        "final latents against fp32",
        "",
        "| recipe | dtype | finite | max abs diff | mean abs diff | mean diff / mean abs latent | mean diff vs sdi's |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    base = result["recipes"].get("sdi", {})
    for recipe, rows in result["recipes"].items():
        for dtype in cfg["dtypes"]:
            row = rows[dtype]
            ref = base.get(dtype, {}).get("mean_abs_diff")
            vs = row["mean_abs_diff"] / ref if row["mean_abs_diff"] is not None and ref else None
            finite = "yes" if row["finite"] else (f"**no** (step {row['first_nonfinite_step']})"
                                                   if row["first_nonfinite_step"] is not None else "**no**")
            if not rows["fp32"]["finite"]:
                finite += " (fp32 not finite)"
            lines.append(f"| {recipe} | {dtype} | {finite} | {_num(row['max_abs_diff'])} | {_num(row['mean_abs_diff'])} | "
                         f"{_num(row['rel_mean_abs_diff'])} | {_num(vs)} |")
    return "\n".join(lines) + "\n"
