"""Shared pieces of the compatibility suite: inputs, the three ways of running a pipeline
(plain, attached-but-idle, with HarmonPaint), the assertions every feature makes, an
identity probe strategy, and tiny random IP-Adapter / ControlNet / PAG builders.

Every feature test asserts:
 (a) attached-but-idle is bit-identical to the plain pipeline with the feature,
 (b) HarmonPaint runs with the feature: finite, right shape, different from plain,
 (c) the feature's own effect is still there with HarmonPaint on.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

import attnctl
import harmonpaint_recipe as hp
from attnctl import ReweightOp, StrategySpec, select_sites
from harmonpaint_recipe.loading import resolved
from harmonpaint_recipe.runner import prompt_token_indices

STEPS = 3
SEED = 0
PROMPT = "a cat"
GUIDANCE = 7.5
#: images are float32 in [0, 1]; below this two outputs count as the same computation
SAME = 1e-5
#: the least mean absolute difference that counts as an effect (rounding differences are ~1e-7)
EFFECT = 1e-4


# ---------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Inputs:
    """A random RGB image and a binary mask (white = inpaint) of one size."""

    image: Image.Image
    mask: Image.Image

    @property
    def mask_tensor(self) -> torch.Tensor:
        """The mask as attnctl's run wants it: float [H, W], 1 = inpaint."""
        return torch.from_numpy(np.asarray(self.mask) / 255.0)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        return self.image.size


def make_inputs(width: int = 64, height: int = 64, seed: int = 0) -> Inputs:
    """A random image and a mask with a box in its middle half."""
    rng = np.random.RandomState(seed)
    image = Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Inputs(image, Image.fromarray(mask))


def call_kwargs(inputs: Inputs, prompt: str | Sequence[str] = PROMPT, steps: int = STEPS, seed: int = SEED,
                strength: float = 1.0, guidance_scale: float = GUIDANCE, **extra: Any) -> dict[str, Any]:
    """The arguments of a pipeline call, the same as ``harmonpaint_recipe.Runner`` makes them."""
    width, height = inputs.size
    return dict(
        prompt=prompt, image=inputs.image, mask_image=inputs.mask, height=height, width=width,
        num_inference_steps=steps, guidance_scale=guidance_scale, strength=strength, negative_prompt=None,
        generator=torch.Generator(device="cpu").manual_seed(seed), output_type="np", **extra,
    )


# ---------------------------------------------------------------------------------- running
def plain(pipe: Any, inputs: Inputs, **kwargs: Any) -> np.ndarray:
    """The pipeline's output images ``[N, H, W, 3]`` (float32 in [0, 1]), nothing attached."""
    return pipe(**call_kwargs(inputs, **kwargs)).images


def layout_for(pipe: Any, kwargs: dict[str, Any]) -> attnctl.BatchLayout:
    """The batch layout of ``pipe(**call_kwargs(..., **kwargs))``."""
    return attnctl.BatchLayout.for_call(
        pipe, prompt=kwargs.get("prompt", PROMPT), num_images_per_prompt=kwargs.get("num_images_per_prompt", 1),
        guidance_scale=kwargs.get("guidance_scale", GUIDANCE), pag_scale=kwargs.get("pag_scale"),
    )


def idle(pipe: Any, inputs: Inputs, adapters: Any = None, **kwargs: Any) -> np.ndarray:
    """The output with attnctl attached, no strategy, inside a run (then detached)."""
    with attnctl.attach(pipe, {}, adapters=adapters) as ctl:
        with ctl.run(layout_for(pipe, kwargs), mask=inputs.mask_tensor):
            return plain(pipe, inputs, **kwargs)


def recipe(*overrides: str, steps: int = STEPS):
    """The shipped ``harmonpaint`` recipe on the tiny model, keeping the pipeline's scheduler."""
    return hp.load_recipe(
        "harmonpaint", ["model.pretrained=tiny", f"sampler.steps={steps}", "sampler.scheduler=pipeline", *overrides]
    )


def harmonpaint(pipe: Any, inputs: Inputs, *overrides: str, adapters: Any = None, **pipeline_kwargs: Any) -> np.ndarray:
    """One image ``[H, W, 3]`` from ``harmonpaint_recipe.inpaint`` with the ``harmonpaint`` recipe."""
    return hp.inpaint(
        inputs.image, inputs.mask, PROMPT, recipe=recipe(*overrides), pipe=pipe, seed=SEED, adapters=adapters,
        pipeline_kwargs={"output_type": "np", **pipeline_kwargs},
    )


def strategies_config(*overrides: str) -> dict[str, Any]:
    """The ``harmonpaint`` recipe's strategies, as an ``attnctl.attach`` config."""
    return {"strategies": resolved(recipe(*overrides))["strategies"]}


@contextmanager
def running(ctl: attnctl.Controller, pipe: Any, inputs: Inputs, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """``with running(ctl, pipe, inputs, **kw) as call: out = plain(pipe, inputs, **call)``: a run
    with the layout, mask and prompt tokens of that call."""
    prompt = kwargs.get("prompt", PROMPT)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    tokens = [prompt_token_indices(pipe.tokenizer, p) for p in prompts]
    with ctl.run(layout_for(pipe, kwargs), mask=inputs.mask_tensor, token_indices=tokens):
        yield kwargs


def harmonpaint_attached(pipe: Any, inputs: Inputs, *overrides: str, **kwargs: Any) -> np.ndarray:
    """HarmonPaint through ``attnctl.attach`` and ``BatchLayout.for_call``: all images ``[N, H, W, 3]``."""
    with attnctl.attach(pipe, strategies_config(*overrides)) as ctl:
        with running(ctl, pipe, inputs, **kwargs) as call:
            return plain(pipe, inputs, **call)


@contextmanager
def no_run_warnings() -> Iterator[None]:
    """Inside, an ``attnctl.RunWarning`` (a strategy that cannot act, a site that never ran) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", attnctl.RunWarning)
        yield


# ---------------------------------------------------------------------------------- assertions
def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def assert_identical(attached: np.ndarray, stock: np.ndarray) -> None:
    """(a): bit for bit."""
    assert attached.shape == stock.shape
    assert np.array_equal(attached, stock), f"attached-but-idle differs from stock by up to {max_diff(attached, stock)}"


def assert_harmonpaint_ran(out: np.ndarray, stock: np.ndarray) -> None:
    """(b): finite, the shape of the stock output, and not the stock output."""
    assert out.shape == stock.shape
    assert np.isfinite(out).all()
    assert mean_diff(out, stock) > EFFECT, "HarmonPaint left the output (nearly) unchanged"


def assert_effect_kept(hp_with: np.ndarray, hp_without: np.ndarray, stock_with: np.ndarray,
                       stock_without: np.ndarray, ratio: float = 0.5) -> None:
    """(c): the feature changes HarmonPaint's output at least ``ratio`` times as much as the stock output."""
    stock_effect = mean_diff(stock_with, stock_without)
    assert stock_effect > EFFECT, f"the feature has no effect on the stock pipeline ({stock_effect}); the test is void"
    hp_effect = mean_diff(hp_with, hp_without)
    assert hp_effect >= ratio * stock_effect, (
        f"with HarmonPaint the feature changes the output by {hp_effect} (mean), without by {stock_effect}"
    )


def assert_same(a: np.ndarray, b: np.ndarray, tol: float = SAME) -> None:
    """Equal up to float rounding (same computation, other kernels or order)."""
    assert a.shape == b.shape
    assert max_diff(a, b) <= tol, f"max difference {max_diff(a, b)} > {tol}"


# ---------------------------------------------------------------------------------- probe strategy
@dataclass
class ProbeParams:
    """Parameters of ``compat_probe``."""

    sites: str = field(default="self", metadata={"help": "sites where the identity reweighting runs"})


@dataclass(eq=False)
class IdentityReweight(ReweightOp):
    """W = 1: attnctl's core computes the site's attention, unchanged.

    With it, a site's output must equal the stock processor's to float rounding; so the
    test shows that the processor's own work (an image branch, perturbed rows, a scaling)
    survives attnctl's core inside it.
    """

    def factors(self, call: attnctl.AttentionCall) -> list[tuple[torch.Tensor, torch.Tensor]]:
        one = call.query.new_ones(1, 1, 1, 1)
        return [(one, one)]


class ProbePlugin:
    """Provides ``compat_probe``: the identity reweighting at the chosen sites."""

    @attnctl.hookimpl
    def attnctl_add_strategies(self) -> list[StrategySpec]:
        return [StrategySpec("compat_probe", "identity reweighting (tests)", ProbeParams)]

    @attnctl.hookimpl
    def attnctl_plan(self, instance, spec, params, sites):
        if spec.name != "compat_probe":
            return None
        return [IdentityReweight(instance, site=s) for s in select_sites(params.sites, sites)]


def probed(pipe: Any, inputs: Inputs, sites: str, adapters: Any = None, **kwargs: Any) -> tuple[np.ndarray, set[str]]:
    """The output with the identity probe at ``sites``, and the site names where it ran."""
    manager = attnctl.StrategyManager(plugins=[ProbePlugin()], autoload=False)
    config = {"strategies": {"probe": {"strategy": "compat_probe", "sites": sites}}}
    with attnctl.attach(pipe, config, manager=manager, adapters=adapters) as ctl:
        with ctl.run(layout_for(pipe, kwargs), mask=inputs.mask_tensor) as state:
            out = plain(pipe, inputs, **kwargs)
        assert state.sites_run, "the probe never ran"
        return out, set(state.sites_run)


# ---------------------------------------------------------------------------------- tiny add-ons
@contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Inside, torch's global RNG starts from ``seed`` (weights that modules draw at init); restored after."""
    saved = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(saved)


IP_IMAGE_EMBED_DIM = 16


def write_tiny_ip_adapter(unet: torch.nn.Module, folder: Path, seed: int = 0, name: str = "ip_adapter.safetensors") -> Path:
    """Random IP-Adapter weights for ``unet`` in the layout ``pipe.load_ip_adapter`` reads.

    ``image_proj.*``: an ``ImageProjection`` (4 image tokens from a
    ``IP_IMAGE_EMBED_DIM``-wide image embedding). ``ip_adapter.{k}.to_k_ip/to_v_ip``: one
    pair per cross-attention processor, numbered 1, 3, 5, ... in ``unet.attn_processors``
    order, as diffusers' converter counts them.
    """
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    tensors = {
        "image_proj.proj.weight": torch.randn(4 * cross, IP_IMAGE_EMBED_DIM, generator=g) * 0.5,
        "image_proj.proj.bias": torch.randn(4 * cross, generator=g) * 0.1,
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    key_id = 1
    for processor_name in unet.attn_processors:
        if processor_name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(processor_name.removesuffix(".processor"))
        hidden = attn.to_k.out_features
        tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross, generator=g) * cross**-0.5
        tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross, generator=g) * cross**-0.5
        key_id += 2
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name))
    return folder / name


def load_tiny_ip_adapter(pipe: Any, *weights: Path) -> None:
    """``pipe.load_ip_adapter`` from local files (one IP-Adapter each), without an image encoder."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "image_encoder is not loaded": expected, embeddings are passed
    try:
        pipe.load_ip_adapter([str(w.parent) for w in weights], subfolder=[""] * len(weights),
                             weight_name=[w.name for w in weights], image_encoder_folder=None)
    finally:
        diffusers_logging.set_verbosity(level)


def ip_image_embeds(seed: int = 1, cfg: bool = True) -> list[torch.Tensor]:
    """``ip_adapter_image_embeds`` for one IP-Adapter: [negative, positive] rows with CFG."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2 if cfg else 1, 1, IP_IMAGE_EMBED_DIM, generator=g)]


def build_tiny_controlnet(seed: int = 3) -> torch.nn.Module:
    """A ``ControlNetModel`` matching the tiny UNet, with random (not zero) output convolutions."""
    from diffusers import ControlNetModel

    from attnctl.testing import TINY_UNET_CONFIG

    shared = ("block_out_channels", "down_block_types", "cross_attention_dim", "attention_head_dim",
              "layers_per_block", "norm_num_groups")
    with seeded_rng(seed):
        controlnet = ControlNetModel(
            in_channels=4, conditioning_embedding_out_channels=(16, 16, 32, 32),
            **{k: TINY_UNET_CONFIG[k] for k in shared},
        )
        # zero convolutions start at zero: give them weights so the ControlNet has an effect
        with torch.no_grad():
            for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                         controlnet.controlnet_cond_embedding.conv_out]:
                conv.weight.normal_(0.0, 0.3)
                conv.bias.normal_(0.0, 0.1)
    return controlnet


def controlnet_pipeline(pipe: Any, controlnet: torch.nn.Module) -> Any:
    """A ``StableDiffusionControlNetInpaintPipeline`` from ``pipe``'s components."""
    from diffusers import StableDiffusionControlNetInpaintPipeline

    c = pipe.components
    out = StableDiffusionControlNetInpaintPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"], controlnet=controlnet,
        scheduler=c["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out.set_progress_bar_config(disable=True)
    return out


def pag_pipeline(pipe: Any, layers: Sequence[str] = ("mid", "up")) -> Any:
    """A ``StableDiffusionPAGInpaintPipeline`` from ``pipe``'s components, PAG on ``layers``."""
    from diffusers import StableDiffusionPAGInpaintPipeline

    c = pipe.components
    out = StableDiffusionPAGInpaintPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=c["unet"],
        scheduler=c["scheduler"], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        pag_applied_layers=list(layers),
    )
    out.set_progress_bar_config(disable=True)
    return out


# ---------------------------------------------------------------------------------- user processors
#: the site the custom processors go to: self[3], where HarmonPaint's SAMS acts (self[2:7])
CUSTOM_SITE = "down_blocks.1.attentions.1.transformer_blocks.0.attn1"


class DoublingProcessor:
    """A user's processor: diffusers' attention, output times 2."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        from diffusers.models.attention_processor import AttnProcessor2_0

        return 2 * AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class GainProcessor:
    """A user's processor with its own keyword argument (``cross_attention_kwargs={"gain": 1.5}``)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 gain: float = 1.0):
        from diffusers.models.attention_processor import AttnProcessor2_0

        return gain * AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
