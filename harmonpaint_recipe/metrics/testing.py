"""Tiny random-weight CLIP checkpoints for offline tests and smoke runs.

``save_tiny_clip(dir)`` writes a complete checkpoint folder (config, safetensors weights, a
byte-level BPE tokenizer with no merges, image processor) that loads through the normal
``CLIPModel.from_pretrained`` / ``CLIPProcessor.from_pretrained`` path. Its scores mean
nothing; they only exercise the code.
"""

from __future__ import annotations

from pathlib import Path

from attnctl.testing import byte_vocab, seeded, write_byte_tokenizer


def save_tiny_clip(
    directory: str | Path,
    *,
    image_size: int = 32,
    hidden: int = 32,
    projection_dim: int = 16,
    seed: int = 0,
) -> Path:
    """Write a tiny random CLIP checkpoint to ``directory`` and return its path."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_byte_tokenizer(directory)  # attnctl's byte-level CLIP tokenizer (no merges)
    vocab = byte_vocab()
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))

    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    layer = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=77, eos_token_id=eos, bos_token_id=bos, pad_token_id=eos, **layer
        ),
        vision_config=dict(image_size=image_size, patch_size=max(image_size // 4, 1), **layer),
        projection_dim=projection_dim,
    )
    with seeded(seed):  # the caller's random state is left alone
        model = CLIPModel(config)
    model.eval().save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory
