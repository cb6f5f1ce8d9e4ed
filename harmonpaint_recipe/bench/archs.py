"""Benchmark architectures: inpainting pipelines with random weights, built from configs.

Nothing is downloaded. The full-size architectures use the published component configs
(UNet: ``attnctl.testing.load_unet_config``; text encoder(s) and VAE: below) of the models
they are named after, built by ``attnctl.testing.build_inpaint_pipeline``; only the
tokenizer is attnctl's byte-level stand-in, which changes the token ids but not the
77-token sequence the text encoder and cross-attention see. ``mid`` is a reduced
SD1.5-shaped pipeline (the same 16 self + 16 cross sites over 4 levels) sized so a
10-step run takes seconds on two CPU cores; ``tiny`` and ``tiny-sdxl`` are
``attnctl.testing``'s ``TINY_SD`` and ``TINY_SDXL``.

The transformers (SD3.5 Medium, FLUX.1 Fill [dev]) are built the same way by
``attnctl.testing.build_dit_pipeline``: the published transformer configs, CLIP, T5-XXL and
VAE sizes, with attnctl's character-level T5 tokenizer. ``mid-sd35`` and ``mid-flux-fill``
keep their depth (24 joint + 13 image-only sites; 19 joint + 38 single sites) and head size
at a fraction of the width, for CPU runs; ``tiny-sd3`` and ``tiny-flux-fill`` are the test models.

``build_pipeline`` makes the models directly on the target device (random initialisation
of billions of parameters is much faster on a GPU than on the host's cores) and then casts
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from attnctl.registry import Registry
from attnctl.testing import (
    FLUX_SCHEDULER_CONFIG,
    SD3_SCHEDULER_CONFIG,
    TINY_DIT,
    TINY_SD,
    TINY_SDXL,
    TINY_VAE_CONFIG,
    DitSpec,
    PipelineSpec,
    build_dit_pipeline,
    build_inpaint_pipeline,
    load_transformer_config,
    load_unet_config,
)

if TYPE_CHECKING:
    import torch

# --- UNets -----------------------------------------------------------------------------
# The full-size UNet configs ship with attnctl (attnctl/testing/configs/*.json, one source of truth).


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

# --- transformers (diffusers model kwargs) ----------------------------------------------
_T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128)
_T5_MID = dict(d_model=256, d_kv=64, d_ff=512, num_layers=4, num_heads=4)
_SD3_VAE = dict(_SD_VAE, latent_channels=16, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False)
_FLUX_VAE = dict(_SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)
_MID_SD3_VAE = dict(_SD3_VAE, block_out_channels=(32, 64, 64, 64), layers_per_block=1, sample_size=256)
_MID_FLUX_VAE = dict(_MID_SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)
_CLIP_MID_HALF = dict(_CLIP_MID, hidden_size=128, intermediate_size=512, projection_dim=128)


def _mid_sd35() -> dict[str, Any]:
    """SD3.5 Medium's depth (24 joint sites, image-only attn2 in blocks 0-12) and head size (64), 4 heads."""
    return dict(load_transformer_config("sd35-medium"), num_attention_heads=4, joint_attention_dim=256,
                caption_projection_dim=256, pooled_projection_dim=256, sample_size=32, pos_embed_max_size=96)


def _mid_flux_fill() -> dict[str, Any]:
    """FLUX.1 Fill's depth (19 joint + 38 single sites) and head size (128, its RoPE axes), 2 heads."""
    return dict(load_transformer_config("flux1-fill-dev"), num_attention_heads=2, joint_attention_dim=256,
                pooled_projection_dim=128)


def _dit_builder(spec: Callable[[], DitSpec]) -> Callable[..., Any]:
    return lambda seed, device=None: build_dit_pipeline(spec(), seed=seed, device=device)


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
        transformer: its denoiser is a transformer (SD3, FLUX), driven by its own flow-matching scheduler.
    """

    name: str
    description: str
    default_size: int
    build: Callable[..., Any] = field(repr=False)
    full_size: bool = True
    recipe: str = "harmonpaint"
    transformer: bool = False


def _spec(unet: dict, text: dict, vae: dict, text_2: dict | None = None) -> PipelineSpec:
    # the published vocabulary size, so the embedding tables have their real size
    return PipelineSpec(unet=unet, vae=vae, text={"vocab_size": 49408, **text},
                        text_2=None if text_2 is None else {"vocab_size": 49408, **text_2})


def _builder(spec: Callable[[], PipelineSpec]) -> Callable[..., Any]:
    return lambda seed, device=None: build_inpaint_pipeline(spec(), seed=seed, device=device)


ARCHITECTURES: Registry[Architecture] = Registry("architecture", {
    a.name: a
    for a in (
        Architecture("sd15-inpaint", "SD 1.5 inpainting (UNet 860M, CLIP ViT-L, SD VAE)", 512,
                     _builder(lambda: _spec(load_unet_config("sd15-inpaint"), _CLIP_L, _SD_VAE))),
        Architecture("sd2-inpaint", "SD 2 inpainting (UNet 865M, OpenCLIP ViT-H, SD VAE)", 512,
                     _builder(lambda: _spec(load_unet_config("sd2-inpaint"), _OPENCLIP_H, _SD_VAE))),
        Architecture("sdxl-inpaint", "SDXL 1.0 inpainting (UNet 2.6B, CLIP ViT-L + OpenCLIP bigG, SDXL VAE)", 1024,
                     _builder(lambda: _spec(load_unet_config("sdxl-inpaint"), _CLIP_L, _SDXL_VAE, _OPENCLIP_BIGG)),
                     recipe="harmonpaint-sdxl"),
        Architecture("mid", "SD1.5 layout and head sizes at 1/4 width, 1/4 heads (UNet 54M), small CLIP and VAE", 256,
                     _builder(lambda: _spec(_mid_unet(), _CLIP_MID, _MID_VAE)), full_size=False),
        Architecture("tiny", "attnctl.testing's tiny SD (test-sized SD1.5 layout)", 64,
                     _builder(lambda: TINY_SD), full_size=False),
        Architecture("tiny-sdxl", "attnctl.testing's tiny SDXL (test-sized SDXL layout)", 64,
                     _builder(lambda: TINY_SDXL), full_size=False, recipe="harmonpaint-sdxl"),
        Architecture("sd35-medium", "SD3.5 Medium inpainting (MMDiT 2.2B, CLIP-L + bigG, T5-XXL, SD3 VAE)", 1024,
                     _dit_builder(lambda: DitSpec("sd3", load_transformer_config("sd35-medium"), _SD3_VAE,
                                                  (_CLIP_L, _OPENCLIP_BIGG), _T5_XXL, SD3_SCHEDULER_CONFIG)),
                     recipe="harmonpaint-sd3", transformer=True),
        Architecture("flux1-fill-dev", "FLUX.1 Fill [dev] (MMDiT 12B, CLIP-L, T5-XXL, FLUX VAE)", 1024,
                     _dit_builder(lambda: DitSpec("flux-fill", load_transformer_config("flux1-fill-dev"), _FLUX_VAE,
                                                  (_CLIP_L,), _T5_XXL, FLUX_SCHEDULER_CONFIG)),
                     recipe="harmonpaint-flux-fill", transformer=True),
        Architecture("mid-sd35", "SD3.5 Medium's 24+13 sites and head size at 4 heads, small CLIPs, T5 and VAE", 256,
                     _dit_builder(lambda: DitSpec("sd3", _mid_sd35(), _MID_SD3_VAE, (_CLIP_MID_HALF, _CLIP_MID_HALF),
                                                  _T5_MID, SD3_SCHEDULER_CONFIG)),
                     full_size=False, recipe="harmonpaint-sd3", transformer=True),
        Architecture("mid-flux-fill", "FLUX.1 Fill's 19+38 sites and head size at 2 heads, small CLIP, T5 and VAE",
                     256, _dit_builder(lambda: DitSpec("flux-fill", _mid_flux_fill(), _MID_FLUX_VAE, (_CLIP_MID_HALF,),
                                                       _T5_MID, FLUX_SCHEDULER_CONFIG)),
                     full_size=False, recipe="harmonpaint-flux-fill", transformer=True),
        Architecture("tiny-sd3", "attnctl.testing's tiny SD3 inpainting (test-sized SD3.5 Medium layout)", 64,
                     _dit_builder(lambda: TINY_DIT["sd3"]), full_size=False, recipe="harmonpaint-sd3", transformer=True),
        Architecture("tiny-flux-fill", "attnctl.testing's tiny FLUX Fill", 64,
                     _dit_builder(lambda: TINY_DIT["flux-fill"]), full_size=False, recipe="harmonpaint-flux-fill", transformer=True),
    )
})


def build_pipeline(arch: Architecture, seed: int, device: torch.device, dtype: torch.dtype) -> Any:
    """``arch``'s pipeline with weights from ``seed``, on ``device`` in ``dtype``.

    On CUDA the models are initialised on the GPU (the same seed gives the same weights
    there run after run, but not the same as on the CPU); elsewhere on the CPU.
    """
    build_device = device if device.type == "cuda" else None
    return arch.build(seed, build_device).to(device=device, dtype=dtype)
