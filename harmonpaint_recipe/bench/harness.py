"""Run the variants interleaved on one pipeline and collect timings and peak memory.

Method (the same for every architecture and device):

- one process, one pipeline object, one set of inputs and one seed for every variant;
- ``warmup`` untimed rounds, then ``repeats`` timed rounds; each round runs every
  variant once (round robin), and the order is rotated by one each round so no variant
  always runs right after the same neighbour;
- a variant's ``setup`` (attach) and ``teardown`` (detach) are outside the timed region;
  the timed region is the whole pipeline call (text encoding, every denoising step with
  CFG, VAE encode and decode), synchronized on CUDA;
- peak memory per run as described in ``bench.memory``.

Reported per variant: median, min and max seconds per image, it/s (denoising steps per
second of the median run), the median peak memory, and both as ratios to ``stock``
(time also as the ratio of the fastest runs, the least disturbed ones on a shared CPU),
and the warm-up runs' times (with ``--compile`` the first one holds the compilation).

With ``stop_after`` (a wall-clock time) no round starts that would end after it, judging
by the rounds so far: the remaining warm-up rounds are dropped, then the remaining timed
rounds; at least one warm-up round (if any was asked for) and one timed round always run,
and the result says how many of each were run.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from attnctl.backbones import denoiser_of as denoiser
from attnctl.errors import ConfigError
from attnctl.layout import BatchLayout
from harmonpaint_recipe.bench.archs import ARCHITECTURES, build_pipeline
from harmonpaint_recipe.bench.compiling import dynamo_counts, dynamo_reasons
from harmonpaint_recipe.bench.memory import PeakMemory, pin_mmap_threshold
from harmonpaint_recipe.bench.targets import check_targets
from harmonpaint_recipe.bench.variants import VARIANTS, BenchInputs, parse_variants
from harmonpaint_recipe.devices import DTYPE_NAMES, resolve_device, resolve_dtype
from harmonpaint_recipe.progress import progress

PROMPT = "a watercolor painting of a small red fox sitting in tall grass"


@dataclass
class BenchConfig:
    """Settings of one ``attnctl bench`` run (see the command's ``--help``)."""

    arch: str = "mid"
    size: int | None = None
    steps: int = 10
    dtype: str = "auto"
    device: str = "auto"
    repeats: int = 3
    warmup: int = 1
    variants: list[str] = field(default_factory=lambda: ["all"])  # names or groups (parse_variants)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend; "eager" traces with dynamo only
    guidance_scale: float = 7.5
    seed: int = 0
    recipe: str | None = None
    sample_interval: float = 0.01
    stop_after: float | None = None  # time.time() after which no timed round may end

    def check(self) -> None:
        """Raise ``ConfigError`` naming the bad option."""
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if self.repeats < 1:
            raise ConfigError(f"--repeats must be at least 1, got {self.repeats}")
        if self.warmup < 0:
            raise ConfigError(f"--warmup must be 0 or more, got {self.warmup}")
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise ConfigError(f"--size must be a positive multiple of 8 (VAE factor), got {self.size}")
        if self.dtype not in ("auto", *DTYPE_NAMES):
            raise ConfigError(f"--dtype must be one of auto, {', '.join(DTYPE_NAMES)}; got '{self.dtype}'")


def device_name(device: torch.device) -> str:
    """Human-readable device description for the report."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {model}, {torch.get_num_threads()} torch threads"


def make_inputs(size: int, seed: int):
    """A smooth random image and a centred rectangular mask (a quarter of the area)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    coarse = rng.rand(8, 8, 3)
    image = Image.fromarray((coarse * 255).astype("uint8")).resize((size, size), Image.BICUBIC)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return image, Image.fromarray(mask), torch.from_numpy(mask >= 128).float()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages (shared machines: a busy CPU skews timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _add_delta(acc: dict[str, int], before: dict[str, int], after: dict[str, int], keep_zero: bool) -> None:
    """Add the growth of each counter from ``before`` to ``after`` into ``acc``."""
    for k, v in after.items():
        delta = v - before.get(k, 0)
        if delta or keep_zero:
            acc[k] = acc.get(k, 0) + delta


def _past_deadline(stop_after: float | None, runs: dict[str, list[float]]) -> bool:
    """Whether one more round, each variant as slow as its slowest run in ``runs``, would end
    after ``stop_after``."""
    if stop_after is None:
        return False
    round_s = sum(max(ts) for ts in runs.values() if ts)
    return time.time() + round_s > stop_after


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark and return the result record (what ``bench.json`` holds)."""
    cfg.check()
    arch = ARCHITECTURES.get(cfg.arch, "--arch")
    device = resolve_device(cfg.device, option="--device")
    dtype = resolve_dtype(cfg.dtype, device, option="--dtype")
    size = cfg.size or arch.default_size
    names = parse_variants(",".join(cfg.variants), transformer=arch.transformer)
    if device.type == "cpu":
        pin_mmap_threshold()

    if log is None:
        from tqdm.auto import tqdm

        log = tqdm.write  # above the progress bar
    if arch.transformer and cfg.compile:
        raise ConfigError(f"--compile is measured on UNet architectures only so far, not on {arch.name}")
    log(f"building {arch.name} ({arch.description}) with random weights ...")
    pipe = build_pipeline(arch, cfg.seed, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    if cfg.compile:
        from harmonpaint_recipe.bench.compiling import compile_unet

        compile_unet(pipe, backend=cfg.compile_backend)
    image, mask_image, mask = make_inputs(size, cfg.seed)

    rounds = cfg.warmup + cfg.repeats
    bar = progress(desc=f"bench {arch.name}", total=rounds * len(names) * cfg.steps, unit="step")

    def on_step(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        bar.update(1)
        return callback_kwargs

    def call_kwargs() -> dict[str, Any]:
        return dict(
            prompt=PROMPT, image=image, mask_image=mask_image, height=size, width=size,
            num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, strength=1.0,
            generator=torch.Generator(device="cpu").manual_seed(cfg.seed), output_type="np",
            callback_on_step_end=on_step,
        )

    recipe = cfg.recipe or arch.recipe
    # the pipeline's own rule: CFG (rows [uncond, cond]) iff guidance_scale > 1, never on FLUX (guidance-distilled)
    layout = BatchLayout.for_call(pipe, prompt=PROMPT, guidance_scale=cfg.guidance_scale)
    inputs = BenchInputs(pipe=pipe, call_kwargs=call_kwargs, mask=mask, prompt=PROMPT, recipe=recipe, layout=layout)
    variants = {n: VARIANTS.get(n)() for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    warmup_times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[int]] = {n: [] for n in names}
    hwms: dict[str, list[int]] = {n: [] for n in names}
    finite: dict[str, bool] = {}
    dynamo: dict[str, dict[str, int]] = {n: {} for n in names}
    dynamo_why: dict[str, dict[str, int]] = {n: {} for n in names}

    load_before = _load_average()
    warmups_run = timed_run = 0
    while warmups_run < cfg.warmup or timed_run < cfg.repeats:
        r = warmups_run + timed_run
        order = names[r % len(names):] + names[: r % len(names)]
        timed = warmups_run >= cfg.warmup
        # near the time limit: no further warm-up round, and no timed round past the first
        if timed and timed_run >= 1 and _past_deadline(cfg.stop_after, times):
            log(f"stopping after {timed_run} timed round(s) of {cfg.repeats}: the next would end past the time limit")
            break
        if not timed and warmups_run >= 1 and _past_deadline(cfg.stop_after, warmup_times):
            log(f"skipping warm-up rounds {warmups_run + 1}-{cfg.warmup}: the time limit is near")
            warmups_run = cfg.warmup
            continue
        if timed:
            timed_run += 1
        else:
            warmups_run += 1
        for n in order:
            bar.set_postfix_str(f"round {r + 1}/{rounds}{'' if timed else ' (warm-up)'}, {n}")
            v = variants[n]
            v.setup(inputs)
            dynamo_before = (dynamo_counts(), dynamo_reasons()) if cfg.compile else None
            try:
                with PeakMemory(device, cfg.sample_interval) as mem:
                    _sync(device)
                    start = time.perf_counter()
                    out = v()
                    _sync(device)
                    elapsed = time.perf_counter() - start
            finally:
                v.teardown()
            finite.setdefault(n, bool(np.isfinite(np.asarray(out)).all()))
            if dynamo_before is not None:
                _add_delta(dynamo[n], dynamo_before[0], dynamo_counts(), keep_zero=True)
                _add_delta(dynamo_why[n], dynamo_before[1], dynamo_reasons(), keep_zero=False)
            del out
            res = mem.result
            log(f"round {r + 1}/{rounds}{'' if timed else ' (warm-up)'}  {n:<12} {elapsed:8.3f} s  "
                f"peak {res.peak / 2**20:9.1f} MiB")
            (times if timed else warmup_times)[n].append(elapsed)
            if timed:
                peaks[n].append(res.peak)
                if res.peak_hwm is not None:
                    hwms[n].append(res.peak_hwm)

    bar.close()
    results: dict[str, dict[str, Any]] = {}
    for n in names:
        t = _summary(times[n])
        p = _summary([float(x) for x in peaks[n]])
        results[n] = {
            "description": variants[n].description,
            "seconds": times[n],
            "warmup_seconds": warmup_times[n],
            "sec_per_image": t,
            "it_per_s": cfg.steps / t["median"],
            "peak_memory": {"runs_bytes": peaks[n], "median_bytes": p["median"], "min_bytes": p["min"],
                            "max_bytes": p["max"]},
            "finite_output": finite[n],
        }
        if cfg.compile:
            results[n]["dynamo"] = dynamo[n]
            results[n]["dynamo_unsupported"] = dynamo_why[n]
        if hwms[n]:
            results[n]["peak_memory"]["hwm_median_bytes"] = statistics.median(hwms[n])
    stock_t = results["stock"]["sec_per_image"]["median"]
    stock_min = results["stock"]["sec_per_image"]["min"]
    stock_m = results["stock"]["peak_memory"]["median_bytes"]
    stock_h = results["stock"]["peak_memory"].get("hwm_median_bytes")
    for n, r in results.items():
        r["time_ratio"] = r["sec_per_image"]["median"] / stock_t
        # the fastest run is the least disturbed one on a shared CPU (noise only adds time)
        r["time_ratio_min"] = r["sec_per_image"]["min"] / stock_min
        r["memory_ratio"] = r["peak_memory"]["median_bytes"] / stock_m if stock_m > 0 else None
        h = r["peak_memory"].get("hwm_median_bytes")
        r["hwm_memory_ratio"] = h / stock_h if h is not None and stock_h else None

    import diffusers

    meta = {
        "command": "attnctl " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("attnctl") else None,
        "rounds": {"warmup": len(warmup_times[names[0]]), "timed": timed_run},
        "config": {**asdict(cfg), "size": size, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                   "recipe": recipe},
        "arch": {"name": arch.name, "description": arch.description, "full_size": arch.full_size,
                 "transformer_parameters" if arch.transformer else "unet_parameters":
                     sum(p.numel() for p in denoiser(pipe).parameters())},
        "device": device_name(device),
        "memory_method": ("cuda max_memory_allocated (absolute)" if device.type == "cuda"
                          else "RSS increase over the pre-run baseline (sampling thread; VmHWM reset as cross-check)"),
        "load_average": {"before": load_before, "after": _load_average()},
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return {"meta": meta, "variants": results, "targets": check_targets(device.type, arch.name, results)}
