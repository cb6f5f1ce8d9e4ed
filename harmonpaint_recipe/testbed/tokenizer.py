"""A word-level CLIP tokenizer for the testbed vocabulary, written locally.

It is a genuine CLIP byte-level BPE tokenizer (``vocab.json`` + ``merges.txt``, loaded by
``transformers.CLIPTokenizer``) whose merges build every vocabulary word into one token,
so "the object tokens" of a prompt are its words. Unknown words fall back to one token per
character, as in CLIP.

How the merges make each word one token: a word ``w = c1 c2 .. cn`` starts as the symbols
``c1, c2, .., cn</w>``; its chain of merges joins them left to right
(``c1+c2``, ``c1c2+c3``, ...). BPE always applies the lowest-ranked merge present. All
merges whose left side has two or more characters rank before all single-character merges,
so once a word's first merge has fired its chain runs to the end. Among the
single-character merges, each word's first merge ranks before any other single-character
merge that could fire inside that word (a topological order, checked for cycles).
"""

from __future__ import annotations

import json
from pathlib import Path

from attnctl.errors import ConfigError
from attnctl.testing import clip_byte_symbols
from harmonpaint_recipe.testbed.vocab import WORDS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: padded prompt length, as in Stable Diffusion
MAX_LENGTH = 77
_END = "</w>"


def _byte_symbols() -> list[str]:
    """CLIP's printable stand-ins for the 256 byte values, in byte order."""
    return [symbol for _, symbol in sorted(clip_byte_symbols())]


def _symbols(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + _END]


def _chain(word: str) -> list[tuple[str, str]]:
    """The merges that build ``word`` left to right."""
    sym = _symbols(word)
    merges, left = [], sym[0]
    for right in sym[1:]:
        merges.append((left, right))
        left = left + right
    return merges


def word_merges(words: tuple[str, ...] = WORDS) -> list[tuple[str, str]]:
    """Merges in rank order such that every word in ``words`` becomes exactly one token."""
    for w in words:
        if not w.isalpha() or not w.islower():
            raise ConfigError(f"vocabulary word '{w}' must be lowercase letters only")
    long_merges: list[tuple[str, str]] = []
    firsts: list[tuple[str, str]] = []
    for w in words:
        chain = _chain(w)
        if not chain:
            continue  # one letter: the byte token "c</w>" already is the word
        if chain[0] not in firsts:
            firsts.append(chain[0])
        long_merges += [m for m in chain[1:] if m not in long_merges]
    # order the single-character merges: a word's first merge before any other first merge
    # that matches an adjacent symbol pair further inside that word
    must_precede: dict[tuple[str, str], set[tuple[str, str]]] = {m: set() for m in firsts}
    for w in words:
        sym = _symbols(w)
        if len(sym) < 2:
            continue
        inner = {(sym[i], sym[i + 1]) for i in range(1, len(sym) - 1)}
        for m in inner & set(firsts):
            if m != (sym[0], sym[1]):
                must_precede[(sym[0], sym[1])].add(m)
    ordered: list[tuple[str, str]] = []
    state: dict[tuple[str, str], int] = {}

    def visit(m: tuple[str, str]) -> None:  # depth-first topological sort
        if state.get(m) == 2:
            return
        if state.get(m) == 1:
            raise ConfigError(f"vocabulary merges form a cycle at {m}; reword the vocabulary")
        state[m] = 1
        for before in firsts:  # everything that must precede ``m`` goes first
            if m in must_precede[before]:
                visit(before)
        state[m] = 2
        ordered.append(m)

    for m in firsts:
        visit(m)
    return long_merges + ordered


def tokenizer_vocab(words: tuple[str, ...] = WORDS) -> dict[str, int]:
    """Token -> id: the 512 byte tokens, the merged tokens, then the start and end tokens."""
    tokens = _byte_symbols()
    tokens += [c + _END for c in tokens]
    seen = set(tokens)
    for left, right in word_merges(words):
        tok = left + right
        if tok not in seen:
            tokens.append(tok)
            seen.add(tok)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(directory: str | Path, words: tuple[str, ...] = WORDS) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(tokenizer_vocab(words), ensure_ascii=False), encoding="utf-8")
    merges = "\n".join(f"{a} {b}" for a, b in word_merges(words))
    (directory / "merges.txt").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": MAX_LENGTH,
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": EOS,
                "pad_token": EOS,
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    return directory


def vocab_size(words: tuple[str, ...] = WORDS) -> int:
    """Number of token ids (the text encoder's embedding rows)."""
    return len(tokenizer_vocab(words))
