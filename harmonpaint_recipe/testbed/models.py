"""The testbed model: a small SD-inpainting-shaped pipeline, its configs, building and loading.

The UNet keeps Stable Diffusion 1.5's attention-site layout (4 levels, CrossAttnDownBlock2D
x3 + DownBlock2D, mirrored up blocks, two layers per block: 16 self- and 16
cross-attention sites), so every recipe written for SD 1.5 applies unchanged. It takes 9
input channels (noisy latent, mask, masked-image latent). The VAE has three levels (scale
factor 4: a 64x64 image is a 16x16x4 latent). The text encoder is a small CLIP text model
over the word-level tokenizer of :mod:`.tokenizer`.

The trained weights ship in ``harmonpaint_recipe/testbed/weights/`` as a diffusers folder
(``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; safetensors), loaded with ``from_pretrained`` from the package only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from attnctl.errors import ConfigError
from attnctl.testing import SD_DDIM_SCHEDULER_CONFIG
from harmonpaint_recipe.testbed.tokenizer import BOS, EOS, MAX_LENGTH, tokenizer_vocab, write_tokenizer
from harmonpaint_recipe.testbed.world import IMAGE_SIZE

#: folder of the shipped pipeline (and of the judges, under ``judges/``)
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
VAE_SCALE = 4
LATENT_SIZE = IMAGE_SIZE // VAE_SCALE
TEXT_DIM = 64

UNET_CONFIG: dict[str, Any] = dict(
    sample_size=LATENT_SIZE,
    in_channels=9,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 96, 128),
    layers_per_block=2,
    cross_attention_dim=TEXT_DIM,
    attention_head_dim=4,
    norm_num_groups=16,
)
VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    mid_block_add_attention=False,
)
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=TEXT_DIM,
    intermediate_size=4 * TEXT_DIM,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    projection_dim=TEXT_DIM,
)


def build_components(seed: int = 0, unet_config: dict | None = None) -> dict[str, Any]:
    """Freshly initialized ``unet``, ``vae`` and ``text_encoder`` (weights drawn from ``seed``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer_vocab()
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**(unet_config or UNET_CONFIG))
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                           pad_token_id=vocab[EOS], **TEXT_CONFIG)
        )
    finally:
        torch.random.set_rng_state(state)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}


def load_tokenizer(directory: str | Path):
    """The word-level CLIP tokenizer, written into ``directory/tokenizer`` and loaded from there."""
    from transformers import CLIPTokenizer

    tok_dir = write_tokenizer(Path(directory) / "tokenizer")
    return CLIPTokenizer.from_pretrained(str(tok_dir))


def assemble_pipeline(unet, vae, text_encoder, tokenizer):
    """A ``StableDiffusionInpaintPipeline`` from the parts, with SD's DDIM schedule."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

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


def save_pipeline(pipe, directory: str | Path, half: bool = False) -> Path:
    """``save_pretrained`` with safetensors; ``half`` stores the UNet in fp16 to save space."""
    directory = Path(directory)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    if half:
        from safetensors.torch import load_file, save_file

        for path in (directory / "unet").glob("*.safetensors"):
            tensors = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
            save_file(tensors, str(path), metadata={"format": "pt"})
    return directory


def load_testbed_pipeline(directory: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Load the testbed pipeline from ``directory`` (default: the shipped weights) with
    ``from_pretrained``, safetensors only, never contacting the hub."""
    from diffusers import StableDiffusionInpaintPipeline

    directory = Path(directory) if directory is not None else WEIGHTS_DIR
    if not (directory / "model_index.json").is_file():
        raise ConfigError(
            f"no testbed pipeline in '{directory}' (model_index.json missing); reinstall attnctl, "
            "or train one with `attnctl testbed train OUT_DIR` and pass its folder"
        )
    from harmonpaint_recipe.devices import dtype_keyword

    # the dtype goes to from_pretrained (the UNet is stored in fp16): casting afterwards would
    # make diffusers warn about fp32-kept modules on every load
    return StableDiffusionInpaintPipeline.from_pretrained(
        str(directory), use_safetensors=True, local_files_only=True,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False, **{dtype_keyword(): dtype},
    )
