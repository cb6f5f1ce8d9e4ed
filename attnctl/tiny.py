"""A tiny random-weight Stable Diffusion inpainting pipeline, for tests and offline smoke runs.

Its images are noise: the weights are random. It has the same site layout as SD 1.5
(16 self- and 16 cross-attention sites over 4 levels), so recipes written for SD 1.5
attach to it unchanged, and a 64x64 image runs in well under a second per step on a CPU.
Everything (tokenizer included) is generated locally; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
#: SD's training noise schedule with DDIM, as in the HarmonPaint paper (Sec. V-A)
SD_DDIM_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _byte_vocab() -> dict[str, int]:
    """A CLIP byte-level BPE vocabulary with no merges: one token per byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tiny_tokenizer(directory: str | Path) -> None:
    """Write a CLIP tokenizer (vocab.json, merges.txt, config) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(_byte_vocab()), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        ),
        encoding="utf-8",
    )


def build_tiny_inpaint_pipeline(seed: int = 0, directory: str | Path | None = None):
    """Build a tiny random ``StableDiffusionInpaintPipeline`` (weights from ``seed``).

    If ``directory`` is given, the tokenizer is written there first (the pipeline needs
    files to load it from); otherwise a temporary folder is used.
    """
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        vocab_size = len(_byte_vocab())
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1,
                projection_dim=32,
            )
        )
    finally:
        torch.random.set_rng_state(generator_state)
    tmp = None
    if directory is None:
        tmp = tempfile.TemporaryDirectory()
        directory = tmp.name
    tok_dir = Path(directory) / "tokenizer"
    write_tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    if tmp is not None:
        tmp.cleanup()
    return StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_DDIM_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_inpaint_pipeline(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random inpainting pipeline folder loadable with ``from_pretrained(directory)``.

    Weights are saved as safetensors. Returns the folder.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_inpaint_pipeline(seed=seed, directory=directory)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    (directory / "README.md").write_text(
        "Tiny random-weight Stable Diffusion inpainting pipeline written by `attnctl make-tiny-model`.\n"
        "Its outputs are noise: it exists for tests and offline smoke runs.\n",
        encoding="utf-8",
    )
    return directory
