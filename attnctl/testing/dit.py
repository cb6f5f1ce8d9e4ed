"""Tiny random-weight DiT inpainting pipelines (SD3 and FLUX.1 Fill), for tests and offline smoke runs.

Their images are noise: the weights are random, and nothing is downloaded. Each keeps its
model's conditioning and attention layout in miniature:

- ``"sd3"``: ``StableDiffusion3InpaintPipeline`` shaped like SD3.5 Medium: MMDiT joint
  attention in 3 blocks (the last one context-pre-only), an extra image-only self-attention
  (``attn2``) in block 0 (``dual_attention_layers``), RMS q/k norms, three text encoders
  (two CLIPs with projection, a T5 encoder) whose CLIP states are zero-padded to the T5 width;
  4 attention sites;
- ``"flux-fill"``: ``FluxFillPipeline``: 2 double-stream and 2 single-stream blocks with 3-axis
  RoPE and guidance embedding, whose input is the packed latents, packed masked-image latents
  and packed pixel mask side by side; CLIP pooled text + T5 text; 4 attention sites.

Both VAEs have 2 blocks (factor 2), so a 64x64 image is a 32x32 latent and a 16x16 token grid
(the SD3 patch embedding and FLUX's 2x2 packing both halve it). The T5 tokenizer is a
character-level Unigram tokenizer built here (``write_t5_char_tokenizer``); the CLIP ones are
``attnctl.testing.pipelines``' byte-level tokenizer.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from attnctl.errors import ConfigError, did_you_mean
from attnctl.testing.pipelines import byte_clip_tokenizer, clip_text_encoder, seeded

DitKind = Literal["sd3", "flux-fill"]
DIT_KINDS: tuple[str, ...] = ("sd3", "flux-fill")

#: width of the tiny T5 encoder, which is also both transformers' ``joint_attention_dim``
_T5_WIDTH = 64
TINY_T5_CONFIG = dict(
    d_model=_T5_WIDTH,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",  # T5 v1.1, as the T5-XXL encoder of SD3 and FLUX
    dropout_rate=0.0,
)

# SD3: CLIP-L and CLIP-G hidden states (16 + 16) are concatenated and zero-padded to the T5
# width (64), as SD3's 768 + 1280 are padded to 4096; the pooled embeds are concatenated (32).
_TINY_SD3_CLIP_L = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                        projection_dim=16)
_TINY_SD3_CLIP_G = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                        projection_dim=16)
TINY_SD3_TRANSFORMER_CONFIG = dict(
    sample_size=32,  # the pipeline's default size: 32 * 2 (VAE) = 64 pixels
    patch_size=2,
    in_channels=16,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=_T5_WIDTH,
    caption_projection_dim=16,  # = heads x head dim, as in every SD3 model
    pooled_projection_dim=32,
    out_channels=16,
    pos_embed_max_size=64,  # token grids up to 64x64: images up to 256x256
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)
# SD3's VAE in miniature: 16 latent channels, no quant convs, SD3's shift and scale
TINY_SD3_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
#: the scheduler config of SD3 / SD3.5
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)

_TINY_FLUX_CLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
_FLUX_LATENT_CHANNELS = 4
_FLUX_VAE_FACTOR = 2
# FLUX Fill's input, per token of the 2x2-packed latent: latents (4 x 2 x 2) + masked-image
# latents (4 x 2 x 2) + the pixel mask of the token's (2 x 2) x (2 x 2) pixels; real FLUX Fill
# has 64 + 64 + 256 = 384 with its 16-channel, factor-8 VAE
_FLUX_PACKED = _FLUX_LATENT_CHANNELS * 4
TINY_FLUX_FILL_TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=2 * _FLUX_PACKED + _FLUX_VAE_FACTOR**2 * 4,
    out_channels=_FLUX_PACKED,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=_T5_WIDTH,
    pooled_projection_dim=_TINY_FLUX_CLIP["hidden_size"],  # CLIPTextModel's pooled output
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),  # sums to the head dim, like FLUX's (16, 56, 56) to 128
)
# FLUX's VAE in miniature (4 latent channels instead of 16), FLUX's shift and scale
TINY_FLUX_VAE_CONFIG = {**TINY_SD3_VAE_CONFIG, "latent_channels": _FLUX_LATENT_CHANNELS,
                        "scaling_factor": 0.3611, "shift_factor": 0.1159}
#: the scheduler config of FLUX.1 [dev] and FLUX.1 Fill [dev]: the shift grows with the token count
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

_NOTE = ("Tiny random-weight {cls} written by attnctl (attnctl.testing.dit, kind '{kind}', seed {seed}).\n"
         "Its outputs are noise: it exists for tests and offline smoke runs.\n")

T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's SentencePiece vocabulary


def t5_char_vocab() -> list[tuple[str, float]]:
    """``(piece, score)`` of the character-level T5 vocabulary: ``<pad>``, ``</s>``, ``<unk>``, the
    word-start marker ``▁``, then the printable ASCII characters (others map to ``<unk>``)."""
    chars = ["▁"] + [chr(c) for c in range(ord("!"), ord("~") + 1)]
    # equal scores: with single characters only, the segmentation is forced anyway
    return [(tok, 0.0) for tok in T5_SPECIAL_TOKENS] + [(c, -math.log(len(chars))) for c in chars]


def write_t5_char_tokenizer(directory: str | Path, model_max_length: int = 512) -> Path:
    """Write the character-level T5 tokenizer (tokenizer.json, tokenizer_config.json) into ``directory``.

    It is T5's SentencePiece pipeline with a character vocabulary: whitespace split, ``▁`` word
    starts, Unigram pieces, ``</s>`` appended; ``T5TokenizerFast.from_pretrained`` loads it.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(Unigram(t5_char_vocab(), unk_id=T5_SPECIAL_TOKENS.index("<unk>"), byte_fallback=False))
    # the same pre-tokenizer, decoder and post-processor as transformers' T5 tokenizer, so that
    # loaders that rebuild the pipeline around the vocabulary (transformers 5) get the same one
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    tokenizer.add_special_tokens(list(T5_SPECIAL_TOKENS))
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length, "extra_ids": 0,
              "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


def t5_char_tokenizer() -> Any:
    """The character-level ``T5TokenizerFast`` (written to a temporary folder and loaded from it)."""
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        return T5TokenizerFast.from_pretrained(str(write_t5_char_tokenizer(tmp)))


def t5_encoder(kwargs: dict[str, Any] | None = None) -> Any:
    """A random-weight ``T5EncoderModel`` (``TINY_T5_CONFIG`` updated by ``kwargs``) for the
    character-level T5 tokenizer. Seed the global RNG (``seeded``) around the call."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**{"vocab_size": len(t5_char_vocab()), **TINY_T5_CONFIG, **(kwargs or {}),
                         "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0})
    return T5EncoderModel(config)


def _check_kind(kind: str) -> None:
    if kind not in DIT_KINDS:
        raise ConfigError(f"unknown tiny DiT kind '{kind}'{did_you_mean(kind, DIT_KINDS)}; "
                          f"known: {', '.join(DIT_KINDS)}")


def _eval(pipe: Any) -> Any:
    """``pipe`` with its models in eval mode, as ``from_pretrained`` leaves them: a freshly built
    model is in training mode, where the VAE's output differs by ~1e-6, so a built pipeline and
    its saved copy would not agree bit for bit."""
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


@dataclass(frozen=True)
class DitSpec:
    """The component configs of a DiT inpainting pipeline (random weights; nothing downloaded).

    Attributes:
        kind: ``"sd3"`` (``StableDiffusion3InpaintPipeline``) or ``"flux-fill"`` (``FluxFillPipeline``).
        transformer: ``SD3Transformer2DModel`` / ``FluxTransformer2DModel`` kwargs.
        vae: ``AutoencoderKL`` kwargs.
        clip: ``CLIPTextConfig`` kwargs of the CLIP encoder(s): two with projection for SD3, one for FLUX.
        t5: ``T5Config`` kwargs over ``TINY_T5_CONFIG`` (its ``d_model`` is the transformer's
            ``joint_attention_dim``; the vocabulary is the character-level tokenizer's unless given).
        scheduler: ``FlowMatchEulerDiscreteScheduler`` kwargs.
    """

    kind: DitKind
    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip: tuple[dict[str, Any], ...]
    t5: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)


TINY_DIT: dict[str, DitSpec] = {
    "sd3": DitSpec("sd3", TINY_SD3_TRANSFORMER_CONFIG, TINY_SD3_VAE_CONFIG, (_TINY_SD3_CLIP_L, _TINY_SD3_CLIP_G),
                   scheduler=SD3_SCHEDULER_CONFIG),
    "flux-fill": DitSpec("flux-fill", TINY_FLUX_FILL_TRANSFORMER_CONFIG, TINY_FLUX_VAE_CONFIG, (_TINY_FLUX_CLIP,),
                         scheduler=FLUX_SCHEDULER_CONFIG),
}


def build_dit_pipeline(spec: DitSpec, seed: int = 0, device: Any = None) -> Any:
    """A random-weight DiT inpainting pipeline from ``spec`` (weights from ``seed``; models made on
    ``device``, default the CPU). The global CPU RNG state is left untouched."""
    import contextlib

    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    _check_kind(spec.kind)
    t5_tokenizer, clip_tokenizer = t5_char_tokenizer(), byte_clip_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(**spec.scheduler)
    on_device = torch.device(device) if device is not None else contextlib.nullcontext()
    if spec.kind == "sd3":
        from diffusers import SD3Transformer2DModel, StableDiffusion3InpaintPipeline

        with seeded(seed), on_device:
            transformer = SD3Transformer2DModel(**spec.transformer)
            vae = AutoencoderKL(**spec.vae)
            text_encoder = clip_text_encoder(spec.clip[0], with_projection=True)
            text_encoder_2 = clip_text_encoder(spec.clip[1], with_projection=True)
            text_encoder_3 = t5_encoder(spec.t5)
        return _eval(StableDiffusion3InpaintPipeline(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
            text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer, text_encoder_3=text_encoder_3,
            tokenizer_3=t5_tokenizer,
        ))
    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    with seeded(seed), on_device:
        transformer = FluxTransformer2DModel(**spec.transformer)
        vae = AutoencoderKL(**spec.vae)
        text_encoder = clip_text_encoder(spec.clip[0], with_projection=False)
        text_encoder_2 = t5_encoder(spec.t5)
    return _eval(FluxFillPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer,
    ))


def build_tiny_dit_pipeline(kind: DitKind, seed: int = 0) -> Any:
    """A tiny random DiT inpainting pipeline: ``StableDiffusion3InpaintPipeline`` (``kind="sd3"``)
    or ``FluxFillPipeline`` (``"flux-fill"``), its weights from ``seed``.

    It runs from prompt strings (``pipe(prompt=..., image=..., mask_image=..., height=64,
    width=64)``); heights and widths must be multiples of 4. The global CPU RNG state is left
    untouched.
    """
    _check_kind(kind)
    return build_dit_pipeline(TINY_DIT[kind], seed=seed)


def save_tiny_dit_pipeline(directory: str | Path, kind: DitKind, seed: int = 0) -> Path:
    """Write a tiny random DiT inpainting pipeline folder (safetensors, with a README.md) that the
    pipeline class's ``from_pretrained(directory)`` loads offline; return the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_dit_pipeline(kind, seed=seed)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    note = _NOTE.format(cls=type(pipe).__name__, kind=kind, seed=seed)
    (directory / "README.md").write_text(note, encoding="utf-8")
    return directory


def tiny_sd3_model() -> Any:
    """The built-in model ``tiny-sd3`` (entry point ``attnctl.models``): the tiny SD3 inpainting pipeline, seed 0."""
    return build_tiny_dit_pipeline("sd3", seed=0)


def tiny_flux_fill_model() -> Any:
    """The built-in model ``tiny-flux-fill`` (entry point ``attnctl.models``): the tiny FLUX Fill pipeline, seed 0."""
    return build_tiny_dit_pipeline("flux-fill", seed=0)
