"""Tiny random-weight CLIP checkpoints for offline tests and smoke runs.

``save_tiny_clip(dir)`` writes a complete checkpoint folder (config, safetensors weights, a
byte-level BPE tokenizer with no merges, image processor) that loads through the normal
``CLIPModel.from_pretrained`` / ``CLIPProcessor.from_pretrained`` path. Its scores mean
nothing; they only exercise the code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _byte_alphabet() -> list[str]:
    # the reversible byte -> printable-unicode table of byte-level BPE (GPT-2 / CLIP)
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    extra = 0
    chars = []
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


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
    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
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
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(directory)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory
