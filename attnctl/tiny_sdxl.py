"""A tiny random-weight SDXL inpainting pipeline, for tests and offline smoke runs.

Its images are noise: the weights are random. The UNet keeps SDXL's *site layout*
(down blocks ``DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D`` with
``transformer_layers_per_block=(1, 2, 10)``, so 70 self- and 70 cross-attention sites
over levels 1 and 2) and SDXL's conditioning (two text encoders, pooled text embeds and
time ids through ``added_cond_kwargs``), with tiny channel widths. Recipes written for
SDXL attach to it unchanged. Nothing is downloaded.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from attnctl.tiny import SD_DDIM_SCHEDULER_CONFIG, TINY_VAE_CONFIG, _byte_vocab, write_tiny_tokenizer

#: time ids: original size (2) + crop top-left (2) + target size (2), each embedded to 8 dims
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


def _text_config(hidden: int, projection: int):
    from transformers import CLIPTextConfig

    vocab_size = len(_byte_vocab())
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=projection,
    )


def build_tiny_sdxl_inpaint_pipeline(seed: int = 0, in_channels: int = 9):
    """Build a tiny random ``StableDiffusionXLInpaintPipeline`` (weights from ``seed``).

    Args:
        seed: seed of the random weights (the global RNG state is left untouched).
        in_channels: 9 for an inpainting UNet, 4 for a text-to-image UNet used through the
            pipeline's latent blending.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**{**TINY_SDXL_UNET_CONFIG, "in_channels": in_channels})
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        text_encoder = CLIPTextModel(_text_config(16, 16))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(16, _POOLED_DIM))
    finally:
        torch.random.set_rng_state(state)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp)
    return StableDiffusionXLInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=DDIMScheduler(**SD_DDIM_SCHEDULER_CONFIG),
        requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def save_tiny_sdxl_inpaint_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SDXL inpainting pipeline folder (safetensors); return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_sdxl_inpaint_pipeline(seed=seed).save_pretrained(str(directory), safe_serialization=True)
    return directory
