"""One builder for random-weight SD 1.x/2.x and SDXL inpainting pipelines, from component configs.

Nothing is downloaded: every component is built from its config with random weights under a
fixed seed, and the tokenizer is attnctl's byte-level CLIP tokenizer written locally. The
same builder makes the tiny test models (``attnctl.testing.tiny``) and full-size
architectures for speed and memory measurements. Its CLIP text encoder and tokenizer builders
also serve the DiT pipelines of ``attnctl.testing.dit``.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

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


@dataclass(frozen=True)
class PipelineSpec:
    """The component configs of an inpainting pipeline.

    Attributes:
        unet: ``UNet2DConditionModel`` kwargs.
        vae: ``AutoencoderKL`` kwargs.
        text: ``CLIPTextConfig`` kwargs of the (first) text encoder; vocabulary and special
            token ids are filled in for the byte-level tokenizer.
        text_2: SDXL's second text encoder (with projection), or None for SD 1.x/2.x.
    """

    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    text_2: dict[str, Any] | None = field(default=None)

    @property
    def is_sdxl(self) -> bool:
        return self.text_2 is not None


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator inside the block; its state is restored afterwards."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def clip_byte_symbols() -> list[tuple[int, str]]:
    """``(byte value, symbol)`` for all 256 bytes in CLIP's order: the printable bytes stand
    for themselves, the others get the code points from 256 up."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [(b, chr(c)) for b, c in zip(bs, cs)]


def byte_vocab() -> dict[str, int]:
    """A CLIP byte-level BPE vocabulary with no merges: one token per byte, then start and end tokens."""
    chars = [symbol for _, symbol in clip_byte_symbols()]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}


def write_byte_tokenizer(directory: str | Path) -> Path:
    """Write the byte-level CLIP tokenizer (vocab.json, merges.txt, config) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(byte_vocab()), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def clip_text_encoder(kwargs: dict[str, Any], with_projection: bool) -> Any:
    """A random-weight CLIP text encoder sized by ``kwargs`` (``CLIPTextConfig`` fields) for the byte tokenizer.

    ``with_projection`` gives ``CLIPTextModelWithProjection`` (SDXL's second encoder, SD3's
    two), otherwise ``CLIPTextModel``. Seed the global RNG (``seeded``) around the call.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab_size = len(byte_vocab())
    # bos/eos/pad are the byte tokenizer's last two ids, so pooling finds the end token
    config = CLIPTextConfig(**{"vocab_size": vocab_size, "max_position_embeddings": 77, **kwargs,
                               "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
                               "pad_token_id": vocab_size - 1})
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def byte_clip_tokenizer() -> Any:
    """The byte-level ``CLIPTokenizer`` (written to a temporary folder and loaded from it)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return CLIPTokenizer.from_pretrained(str(write_byte_tokenizer(tmp)))


def build_inpaint_pipeline(spec: PipelineSpec, seed: int = 0, in_channels: int | None = None, device=None):
    """A random-weight ``StableDiffusion(XL)InpaintPipeline`` from ``spec`` (weights from ``seed``).

    Args:
        spec: the component configs.
        seed: seed of the random weights (the global CPU RNG state is left untouched).
        in_channels: override the UNet's input channels (9: inpainting UNet; 4: a text-to-image
            UNet used through the pipeline's latent blending).
        device: build the models there (initialising billions of parameters is much faster on
            a GPU; the weights then come from that device's generator). Default: the CPU.
    """
    import contextlib

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    unet_config = spec.unet if in_channels is None else {**spec.unet, "in_channels": in_channels}
    on_device = torch.device(device) if device is not None else contextlib.nullcontext()
    with seeded(seed), on_device:
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**spec.vae)
        text_encoder = clip_text_encoder(spec.text, with_projection=False)
        text_encoder_2 = clip_text_encoder(spec.text_2, with_projection=True) if spec.is_sdxl else None
    tokenizer = byte_clip_tokenizer()
    scheduler = DDIMScheduler(**SD_DDIM_SCHEDULER_CONFIG)
    if spec.is_sdxl:
        from diffusers import StableDiffusionXLInpaintPipeline

        return StableDiffusionXLInpaintPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, requires_aesthetics_score=False,
            force_zeros_for_empty_prompt=True, add_watermarker=False,
        )
    from diffusers import StableDiffusionInpaintPipeline

    return StableDiffusionInpaintPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_inpaint_pipeline(directory: str | Path, spec: PipelineSpec, seed: int = 0, note: str = "") -> Path:
    """Write the pipeline of ``spec`` as a folder ``from_pretrained`` loads (safetensors); return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_inpaint_pipeline(spec, seed).save_pretrained(str(directory), safe_serialization=True)
    if note:
        (directory / "README.md").write_text(note, encoding="utf-8")
    return directory
