"""Predicted peak memory and FLOPs of each variant at full size, on a CPU, without allocating.

The UNet is built and run on *fake tensors* (``torch._subclasses.fake_tensor``: shapes,
dtypes and devices, no data), with attnctl attached exactly as a run attaches it. Two
dispatch modes watch every aten operation, forward and backward:

- ``TensorBytes`` adds up the bytes of every tensor storage alive (weights and buffers
  registered up front, then each operation's outputs until the last reference dies): the
  peak is what a caching-free allocator would need for tensors. Not counted: allocator
  caching and fragmentation, cuDNN/cuBLAS workspaces, kernels' internal scratch (flash
  attention's), the CUDA context, the VAE and text encoders;
- ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of matrix products,
  convolutions and attention (elementwise work and norms are not counted: they are memory
  bound, and a few percent of the FLOPs). torch has no formula for the CPU attention kernel
  (``_scaled_dot_product_flash_attention_for_cpu``, the one fake tensors dispatch to here), so
  ``FLOP_FORMULAS`` gives it the CUDA kernels' formula: ``QK^T`` and ``AV``, forward and backward.

One denoising step is simulated for every distinct set of active ops in the run's
schedule (steps whose ops are the same cost the same), so a 50-step run costs a few steps
of CPU time. Data-dependent work cannot be predicted from shapes: Attend-and-Excite's
refinement loop (how many iterations depends on the loss) is left out of this predictor.
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

import attnctl
from attnctl.errors import RunWarning
from attnctl.layout import BatchLayout
from attnctl.ops import MAIN
from attnctl.run_state import RunState

#: variants the predictor knows: recipe and overrides (the bench's method variants' settings)
PREDICT_VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "stock": ("", ()),
    "idle": ("sdi", ()),
    "sams+makvs": ("", ("strategies.steer.enabled=false",)),
    "harmonpaint": ("", ()),
    "p2p": ("p2p-replace", ("strategies.p2p.source_prompt=a red fox", "strategies.p2p.blend_words=[red,red]")),
    "masactrl": ("masactrl", ("strategies.masa.source_prompt=a red fox",)),
    "style-aligned": ("style-aligned", ("strategies.style.reference_prompt=a red fox",)),
    "pag": ("pag", ()),
}
PROMPT = "a red fox"


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


#: FLOP formulas torch lacks (``FlopCounterMode(custom_mapping=...)``)
FLOP_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def flop_counter():
    """A ``FlopCounterMode`` that also counts the CPU attention kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)


class TensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages, and their peak, while active (fake tensors included)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def add(self, *tensors: torch.Tensor) -> None:
        """Count tensors made before the mode (weights, inputs)."""
        for tensor in tensors:
            self._track(tensor)

    def reset_peak(self) -> None:
        self.peak = self.current

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._live:
            return
        size = storage.nbytes()
        self.current += size
        self.peak = max(self.peak, self.current)
        self._live[storage] = weakref.ref(storage, lambda _, n=size: self._free(n))

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return out


@dataclass
class Prediction:
    """One variant's prediction: peak bytes of one step (the largest), FLOPs of the whole run."""

    variant: str
    peak_bytes: int
    weight_bytes: int
    flops: int
    step_groups: list[dict] = field(default_factory=list)


def _unet_config(arch: str) -> dict:
    from harmonpaint_recipe.bench.archs import _mid_unet
    from attnctl.testing import load_unet_config
    from attnctl.testing.tiny import TINY_SDXL_UNET_CONFIG, TINY_UNET_CONFIG

    return {"mid": _mid_unet, "tiny": lambda: TINY_UNET_CONFIG, "tiny-sdxl": lambda: TINY_SDXL_UNET_CONFIG}.get(
        arch, lambda: load_unet_config(arch))()


class _Stub(SimpleNamespace):
    """What attnctl reads of a pipeline: the UNet, the scheduler, a tokenizer, the guidance scale, text embeddings."""

    def encode_prompt(self, prompt, device=None, num_images_per_prompt=1, do_classifier_free_guidance=False, **_):
        with self.fake:
            embeds = torch.randn(1, 77, self.text_dim, dtype=self.dtype)
            pooled = torch.randn(1, self.pooled_dim, dtype=self.dtype) if self.pooled_dim else None
        return (embeds, None) if pooled is None else (embeds, None, pooled, None)


def predict(arch: str, size: int, variants: list[str], steps: int = 50, dtype: torch.dtype = torch.float16,
            guidance_scale: float = 7.5, progress=None) -> list[Prediction]:
    """Predict ``variants`` for ``arch`` at ``size`` x ``size`` pixels, ``steps`` DDIM steps, CFG."""
    from diffusers import UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode

    from attnctl.testing import write_byte_tokenizer
    from transformers import CLIPTokenizer

    config = _unet_config(arch)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            unet = UNet2DConditionModel(**config).eval()
        finally:
            torch.set_default_dtype(default)
    sdxl = config.get("addition_embed_type") == "text_time"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_byte_tokenizer(tmp)))
    stub = _Stub(unet=unet, tokenizer=tokenizer, fake=fake, dtype=dtype, text_dim=config["cross_attention_dim"],
                 pooled_dim=1280 if sdxl else 0, _guidance_scale=guidance_scale)
    return [_predict_variant(stub, name, size, steps, sdxl, progress) for name in variants]


def _predict_variant(stub: _Stub, name: str, size: int, steps: int, sdxl: bool, progress) -> Prediction:
    with warnings.catch_warnings():
        return _predict_one(stub, name, size, steps, sdxl, progress)


def _predict_one(stub: _Stub, name: str, size: int, steps: int, sdxl: bool, progress) -> Prediction:
    from diffusers import DDIMScheduler

    from attnctl.testing import SD_DDIM_SCHEDULER_CONFIG
    from harmonpaint_recipe.loading import load_recipe, resolved
    from harmonpaint_recipe.runner import attach_config

    recipe, overrides = PREDICT_VARIANTS[name]
    stub.scheduler = DDIMScheduler.from_config(SD_DDIM_SCHEDULER_CONFIG)
    stub.scheduler.set_timesteps(steps)
    config = {} if name == "stock" else attach_config(resolved(load_recipe(
        recipe or ("harmonpaint-sdxl" if sdxl else "harmonpaint"), list(overrides))))
    ctl = attnctl.attach(stub, config)
    layout = BatchLayout.for_pipeline(1, 1, cfg=stub._guidance_scale > 1)
    h = w = size // 8
    mask = torch.zeros(size, size)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
    groups = _step_groups(ctl.plan, layout, [int(t) for t in stub.scheduler.timesteps])
    weight_bytes = sum(p.untyped_storage().nbytes() for p in stub.unet.parameters())
    result = Prediction(name, 0, weight_bytes, 0)
    try:
        warnings.simplefilter("ignore", RunWarning)  # each group's run starts mid-schedule on purpose
        for index, count in groups:
            t = int(stub.scheduler.timesteps[index])
            with stub.fake:
                latents = torch.randn(1, 4, h, w, dtype=stub.dtype)
                extra = torch.randn(len(layout), stub.unet.config.in_channels - 4, h, w, dtype=stub.dtype)
                text = torch.randn(len(layout), 77, stub.text_dim, dtype=stub.dtype)
                added = ({"text_embeds": torch.randn(len(layout), 1280, dtype=stub.dtype),
                          "time_ids": torch.randn(len(layout), 6, dtype=stub.dtype)} if sdxl else None)
            meter = TensorBytes()
            meter.add(*stub.unet.parameters(), *stub.unet.buffers(), latents, extra, text, *(added or {}).values())
            with ctl.run(layout, mask=mask, token_indices=[[1, 2, 3]], prompts=[PROMPT]):
                with meter, flop_counter() as flops, torch.no_grad():
                    sample = stub.scheduler.scale_model_input(torch.cat([latents] * len(layout)), t)
                    eps = stub.unet(torch.cat([sample, extra], dim=1), t, text, added_cond_kwargs=added).sample
                    guided = eps.chunk(len(layout))[-1]
                    stub.scheduler.step(guided, t, latents)
            result.peak_bytes = max(result.peak_bytes, meter.peak)
            result.flops += count * flops.get_total_flops()
            result.step_groups.append({"first_step": index, "steps": count, "peak_bytes": meter.peak,
                                       "flops": flops.get_total_flops()})
            if progress:
                progress(name, index, count)
    finally:
        ctl.detach()
    return result


def _step_groups(plan: Any, layout: BatchLayout, timesteps: list[int]) -> list[tuple[int, int]]:
    """(first step index, how many steps) for each distinct set of active ops over the schedule."""
    probe = RunState(plan, layout, timesteps=timesteps)
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(timesteps):
        probe.begin_step(float(t), prepare=False)
        active = tuple(sorted((site, tuple(id(op) for op in a.all)) for site, a in probe.active_in(MAIN).items()))
        key = (active, tuple(id(op) for op in probe.active_latent_ops), tuple(id(op) for op in probe.active_step_ops))
        groups.setdefault(key, []).append(i)
    return [(steps[0], len(steps)) for steps in groups.values()]


#: what ``attnctl bench --predict`` predicts by default: the three full-size models at their own sizes
DEFAULT_TARGETS = (("sd15-inpaint", 512), ("sd2-inpaint", 768), ("sdxl-inpaint", 1024))


def predict_table(arch: str, size: int, steps: int, dtype: torch.dtype, predictions: list[Prediction]) -> list[str]:
    """Markdown rows: absolute numbers and ratios to stock (the first prediction must be stock)."""
    stock = predictions[0]
    lines = [f"**{arch}**, {size}x{size}, {steps} DDIM steps, CFG, {str(dtype).replace('torch.', '')}, batch 1",
             "", "| variant | peak GiB (one step) | vs stock | TFLOPs per image | vs stock (compute floor) |",
             "|---|---:|---:|---:|---:|"]
    for p in predictions:
        lines.append(f"| {p.variant} | {p.peak_bytes / 2**30:.2f} | {p.peak_bytes / stock.peak_bytes:.3f} | "
                     f"{p.flops / 1e12:.4g} | {p.flops / stock.flops:.3f} |")
    return lines


def run_predictions(targets, variants: list[str], steps: int, dtype: torch.dtype, progress=None) -> dict:
    """Predict every (arch, size) of ``targets``; stock is always first. Returns the JSON-ready result."""
    names = ["stock", *[v for v in variants if v != "stock"]]
    unknown = [v for v in names if v not in PREDICT_VARIANTS]
    if unknown:
        from attnctl.errors import ConfigError

        raise ConfigError(f"--predict knows the variants {', '.join(PREDICT_VARIANTS)}; not {', '.join(unknown)} "
                          "(naive builds its own processors on a real pipeline, Attend-and-Excite's refinement "
                          "depends on the image: time them with attnctl bench)")
    out = {}
    for arch, size in targets:
        predictions = predict(arch, size, names, steps=steps, dtype=dtype, progress=progress)
        out[f"{arch}@{size}"] = {
            "arch": arch, "size": size, "steps": steps, "dtype": str(dtype).replace("torch.", ""),
            "variants": {p.variant: {"peak_bytes": p.peak_bytes, "weight_bytes": p.weight_bytes, "flops": p.flops,
                                     "peak_ratio": p.peak_bytes / predictions[0].peak_bytes,
                                     "flop_ratio": p.flops / predictions[0].flops, "step_groups": p.step_groups}
                         for p in predictions},
            "table": predict_table(arch, size, steps, dtype, predictions),
        }
    return out
