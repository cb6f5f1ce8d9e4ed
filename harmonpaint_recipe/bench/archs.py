"""Benchmark architectures: inpainting pipelines with random weights, built from configs.

Nothing is downloaded. The full-size architectures use the published component configs
(UNet: ``attnctl.unet_configs``; text encoder(s) and VAE: below) of the models they are
named after; only the tokenizer is
attnctl's byte-level stand-in (``attnctl.tiny``), which changes the token ids but not the
77-token sequence the text encoder and cross-attention see. ``mid`` is a reduced
SD1.5-shaped pipeline (the same 16 self + 16 cross sites over 4 levels) sized so a
10-step run takes seconds on two CPU cores; ``tiny`` and ``tiny-sdxl`` are
``attnctl.tiny`` and ``attnctl.tiny_sdxl``.

``build_pipeline`` makes the models of the built-from-config architectures directly on
the target device (random initialisation of billions of parameters is much faster on a
GPU than on the host's cores) and then casts them.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from attnctl.errors import ConfigError, did_you_mean
from attnctl.unet_configs import load_unet_config
from attnctl.tiny import SD_DDIM_SCHEDULER_CONFIG, TINY_VAE_CONFIG

# --- UNets -----------------------------------------------------------------------------
# The full-size UNet configs ship with attnctl (attnctl/configs/*.json, one source of truth).


def _mid_unet() -> dict[str, Any]:
    """SD1.5's layout (16 self + 16 cross sites, 4 levels) at a quarter of the width and a
    quarter of the heads: every head keeps SD1.5's head size (40/80/160 channels), and at
    256x256 (32x32 latent) the tokens-per-channel ratio N/C of every level equals SD1.5's
    at 512x512, so attention vs. convolution/projection cost is balanced as in SD1.5."""
    return dict(
        load_unet_config("sd15-inpaint"),
        block_out_channels=(80, 160, 320, 320),
        cross_attention_dim=192,
        attention_head_dim=2,  # diffusers' legacy name: the number of heads (SD1.5: 8)
        norm_num_groups=16,
        sample_size=32,
    )


# --- text encoders (transformers CLIPTextConfig kwargs) --------------------------------
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               projection_dim=768, hidden_act="quick_gelu")
# SD2 keeps 23 of OpenCLIP ViT-H's 24 layers
_OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                   projection_dim=512, hidden_act="gelu")
_OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                      projection_dim=1280, hidden_act="gelu")
_CLIP_MID = dict(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 projection_dim=192, hidden_act="quick_gelu")

# --- VAEs (diffusers AutoencoderKL kwargs) ---------------------------------------------
_SD_VAE = dict(TINY_VAE_CONFIG, block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
               sample_size=512)
_SDXL_VAE = dict(_SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
_MID_VAE = dict(_SD_VAE, block_out_channels=(32, 64, 64, 64), layers_per_block=1, sample_size=256)

@dataclass(frozen=True)
class Architecture:
    """A benchmark architecture.

    Attributes:
        name: CLI name.
        description: one line for reports.
        default_size: image side in pixels the model was trained at.
        build: ``build(seed, device) -> pipeline`` in fp32, its models made on ``device``
            (``None``: on CPU; the tiny builders ignore it).
        full_size: whether the components are the published sizes.
        recipe: the HarmonPaint recipe written for this architecture.
    """

    name: str
    description: str
    default_size: int
    build: Callable[..., Any] = field(repr=False)
    full_size: bool = True
    recipe: str = "harmonpaint"


def _text_encoder(kwargs: dict, vocab_size: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # bos/eos/pad follow attnctl's byte tokenizer (its last two ids), so pooling finds the eos
    config = CLIPTextConfig(vocab_size=max(vocab_size, 49408), max_position_embeddings=77,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                            pad_token_id=vocab_size - 1, **kwargs)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tokenizer():
    from transformers import CLIPTokenizer

    from attnctl.tiny import _byte_vocab, write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    return tokenizer, len(_byte_vocab())


def _seeded(seed: int, make: Callable[[], Any], device: torch.device | str | None = None) -> Any:
    """Run ``make`` under ``seed`` (its tensors created on ``device``) without disturbing the
    host RNG. Only the models are made under the device context: schedulers keep their tables
    on the host, as diffusers expects."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return make()
    finally:
        torch.random.set_rng_state(state)


def _build_sd(unet_config: Callable[[], dict], text_config: dict, vae_config: dict) -> Callable[[int], Any]:
    def build(seed: int, device: torch.device | str | None = None):
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

        tokenizer, vocab = _tokenizer()

        def make():
            return (UNet2DConditionModel(**unet_config()), AutoencoderKL(**vae_config), _text_encoder(text_config, vocab))

        unet, vae, text_encoder = _seeded(seed, make, device)
        return StableDiffusionInpaintPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=DDIMScheduler(**SD_DDIM_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )

    return build


def _build_sdxl(seed: int, device: torch.device | str | None = None):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel

    tokenizer, vocab = _tokenizer()

    def make():
        return (UNet2DConditionModel(**load_unet_config("sdxl-inpaint")), AutoencoderKL(**_SDXL_VAE), _text_encoder(_CLIP_L, vocab),
                _text_encoder(_OPENCLIP_BIGG, vocab, with_projection=True))

    unet, vae, text_encoder, text_encoder_2 = _seeded(seed, make, device)
    return StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=DDIMScheduler(**SD_DDIM_SCHEDULER_CONFIG),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
    )


def _build_tiny(seed: int, device: torch.device | str | None = None):
    from attnctl.tiny import build_tiny_inpaint_pipeline

    return build_tiny_inpaint_pipeline(seed=seed)


def _build_tiny_sdxl(seed: int, device: torch.device | str | None = None):
    from attnctl.tiny_sdxl import build_tiny_sdxl_inpaint_pipeline

    return build_tiny_sdxl_inpaint_pipeline(seed=seed)


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("sd15-inpaint", "SD 1.5 inpainting (UNet 860M, CLIP ViT-L, SD VAE)", 512,
                     _build_sd(lambda: load_unet_config("sd15-inpaint"), _CLIP_L, _SD_VAE)),
        Architecture("sd2-inpaint", "SD 2 inpainting (UNet 865M, OpenCLIP ViT-H, SD VAE)", 512,
                     _build_sd(lambda: load_unet_config("sd2-inpaint"), _OPENCLIP_H, _SD_VAE)),
        Architecture("sdxl-inpaint", "SDXL 1.0 inpainting (UNet 2.6B, CLIP ViT-L + OpenCLIP bigG, SDXL VAE)", 1024,
                     _build_sdxl, recipe="harmonpaint-sdxl"),
        Architecture("mid", "SD1.5 layout and head sizes at 1/4 width, 1/4 heads (UNet 54M), small CLIP and VAE", 256,
                     _build_sd(_mid_unet, _CLIP_MID, _MID_VAE), full_size=False),
        Architecture("tiny", "attnctl.tiny (test-sized SD1.5 layout)", 64, _build_tiny, full_size=False),
        Architecture("tiny-sdxl", "attnctl.tiny_sdxl (test-sized SDXL layout)", 64, _build_tiny_sdxl, full_size=False,
                     recipe="harmonpaint-sdxl"),
    )
}


def get_architecture(name: str) -> Architecture:
    """The architecture called ``name``; ``ConfigError`` listing the known ones otherwise."""
    if name not in ARCHITECTURES:
        raise ConfigError(
            f"--arch: unknown architecture '{name}'{did_you_mean(name, ARCHITECTURES)}; "
            f"choose one of {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


def build_pipeline(arch: Architecture, seed: int, device: torch.device, dtype: torch.dtype) -> Any:
    """``arch``'s pipeline with weights from ``seed``, on ``device`` in ``dtype``.

    On CUDA the models are initialised on the GPU (the same seed gives the same weights
    there run after run, but not the same as on the CPU); elsewhere on the CPU.
    """
    build_device = device if device.type == "cuda" else None
    return arch.build(seed, build_device).to(device=device, dtype=dtype)
