"""Tiny random-weight SD and SDXL inpainting pipelines, for tests and offline smoke runs.

Their images are noise: the weights are random. ``TINY_SD`` has SD 1.5's site layout (16
self- and 16 cross-attention sites over 4 levels); ``TINY_SDXL`` keeps SDXL's (70 + 70 sites
over levels 1 and 2, ``transformer_layers_per_block=(1, 2, 10)``) and SDXL's conditioning
(two text encoders, pooled text embeds and time ids), with tiny widths. Recipes written for
those models attach unchanged, and a 64x64 image runs in well under a second per step on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from attnctl.testing.pipelines import PipelineSpec, build_inpaint_pipeline, save_inpaint_pipeline

Kind = Literal["sd", "sdxl"]

TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=9,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=2,
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=16,
)
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(16, 16, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)

#: SDXL time ids: original size (2) + crop top-left (2) + target size (2), each embedded to 8 dims
_TIME_EMBED_DIM = 8
_POOLED_DIM = 16
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=9,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 16, 32),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    cross_attention_dim=32,  # text encoder (16) + text encoder 2 (16), concatenated
    addition_embed_type="text_time",
    addition_time_embed_dim=_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * _TIME_EMBED_DIM + _POOLED_DIM,
    norm_num_groups=8,
)
_TINY_SDXL_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)

TINY_SD = PipelineSpec(unet=TINY_UNET_CONFIG, vae=TINY_VAE_CONFIG, text=_TINY_TEXT)
TINY_SDXL = PipelineSpec(unet=TINY_SDXL_UNET_CONFIG, vae=TINY_VAE_CONFIG, text={**_TINY_SDXL_TEXT, "projection_dim": 16},
                         text_2={**_TINY_SDXL_TEXT, "projection_dim": _POOLED_DIM})
TINY_SPECS: dict[str, PipelineSpec] = {"sd": TINY_SD, "sdxl": TINY_SDXL}
_NOTE = ("Tiny random-weight Stable Diffusion inpainting pipeline written by `attnctl make-tiny-model`.\n"
         "Its outputs are noise: it exists for tests and offline smoke runs.\n")


def build_tiny_inpaint_pipeline(seed: int = 0, kind: Kind = "sd", in_channels: int = 9):
    """A tiny random ``StableDiffusionInpaintPipeline`` (``kind="sd"``) or SDXL one (``"sdxl"``)."""
    return build_inpaint_pipeline(TINY_SPECS[kind], seed=seed, in_channels=in_channels)


def save_tiny_inpaint_pipeline(directory: str | Path, seed: int = 0, kind: Kind = "sd") -> Path:
    """Write a tiny random inpainting pipeline folder loadable with ``from_pretrained(directory)``."""
    return save_inpaint_pipeline(directory, TINY_SPECS[kind], seed=seed, note=_NOTE)


def tiny_model() -> Any:
    """The built-in model ``tiny`` (entry point ``attnctl.models``): the tiny SD pipeline, seed 0."""
    return build_tiny_inpaint_pipeline(seed=0, kind="sd")


def tiny_sdxl_model() -> Any:
    """The built-in model ``tiny-sdxl`` (entry point ``attnctl.models``): the tiny SDXL pipeline, seed 0."""
    return build_tiny_inpaint_pipeline(seed=0, kind="sdxl")
