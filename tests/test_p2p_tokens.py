"""Prompt-to-Prompt token bookkeeping (strategies/p2p_tokens.py), on hand-worked examples.

Two tokenizers: the byte-level CLIP tokenizer of the tiny test pipelines (one token per
character, so a word of n letters is n tokens) and a small BPE CLIP tokenizer written here,
where most words are one token and "tiger" is two ("ti", "ger").
"""

from __future__ import annotations

import json

import pytest
import torch

from strategies.p2p_tokens import (
    equalizer,
    refinement_mapper,
    refinement_mappers,
    replacement_mapper,
    replacement_mappers,
    time_word_alpha,
    word_token_positions,
)


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    """The tokenizer the tiny pipelines are built with (attnctl.testing.pipelines)."""
    from transformers import CLIPTokenizer

    from attnctl.testing.pipelines import write_byte_tokenizer

    return CLIPTokenizer.from_pretrained(str(write_byte_tokenizer(tmp_path_factory.mktemp("byte-tok"))))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    """The byte vocabulary plus a few merges: cat, dog, on, mat, big are one token; tiger is ti + ger."""
    from transformers import CLIPTokenizer

    from attnctl.testing.pipelines import byte_vocab, write_byte_tokenizer

    directory = write_byte_tokenizer(tmp_path_factory.mktemp("bpe-tok"))
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "o n</w>", "m a", "ma t</w>", "t i", "g e", "ge r</w>",
              "b i", "bi g</w>"]
    vocab = byte_vocab()
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(str(directory))
    assert tok.convert_ids_to_tokens(tok.encode("a tiger on a mat")) == [
        "<|startoftext|>", "a</w>", "ti", "ger</w>", "on</w>", "a</w>", "mat</w>", "<|endoftext|>"]
    return tok


# ---- word positions -------------------------------------------------------------------------------


def test_word_positions_byte_tokenizer(byte_tok):
    assert word_token_positions("a cat sits", "cat", byte_tok) == [2, 3, 4]
    assert word_token_positions("a cat sits", 2, byte_tok) == [5, 6, 7, 8]
    assert word_token_positions("a cat and a cat", "cat", byte_tok) == [2, 3, 4, 9, 10, 11]
    # lowercased by the tokenizer, punctuation split off but still part of the space-separated word
    assert word_token_positions("A Cat, sits", 1, byte_tok) == [2, 3, 4, 5]
    assert word_token_positions("A Cat, sits", "sits", byte_tok) == [6, 7, 8, 9]
    # a double space makes an empty word that owns no tokens
    assert word_token_positions("a cat  sits", 3, byte_tok) == [5, 6, 7, 8]
    assert word_token_positions("a cat sits", "dog", byte_tok) == []


def test_word_positions_bpe_tokenizer(bpe_tok):
    assert word_token_positions("a tiger on a mat", "tiger", bpe_tok) == [2, 3]
    assert word_token_positions("a tiger on a mat", "a", bpe_tok) == [1, 5]
    assert word_token_positions("a tiger on a mat", 4, bpe_tok) == [6]


def test_word_index_out_of_range(byte_tok):
    with pytest.raises(ValueError, match="3 words"):
        word_token_positions("a cat sits", 3, byte_tok)


# ---- replace ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source,target", [("a cat sits", "a dog sits"), ("a cat on a mat", "a dog on a mat")])
def test_replace_equal_token_counts_is_identity(byte_tok, bpe_tok, source, target):
    """Same token count: every source position maps to the same target position."""
    for tok in (byte_tok, bpe_tok):
        m = replacement_mapper(source, target, tok)
        assert m.dtype == torch.float32 and m.shape == (77, 77)
        assert torch.equal(m, torch.eye(77))


def test_replace_one_to_two_tokens_splits_weight(bpe_tok):
    m = replacement_mapper("a cat on a mat", "a tiger on a mat", bpe_tok)
    assert m[2, 2] == 0.5 and m[2, 3] == 0.5  # "cat" spreads over "ti" and "ger"
    assert m[0, 0] == 1 and m[1, 1] == 1
    # after the last replaced word the authors write (j, j): source "on" (3) should go to target "on" (4),
    # but row 3 stays empty and (4, 4) is set instead
    assert m[3].sum() == 0 and m[3, 4] == 0 and m[4, 4] == 1
    assert all(m[k, k] == 1 for k in range(4, 77))
    assert m.sum() == 1 + 1 + 1 + (77 - 4)


def test_replace_two_to_one_tokens_stops_early(bpe_tok):
    m = replacement_mapper("a tiger on a mat", "a cat on a mat", bpe_tok)
    assert m[2, 2] == 1 and m[3, 2] == 1  # 1 / len(target tokens) = 1
    # i runs one ahead of j after the word, so the loop ends before (76, 76)
    assert all(m[k, k] == 1 for k in range(3, 76)) and m[76, 76] == 0


def test_replace_between_words_uses_i_j(byte_tok):
    """Before the last replaced word positions map (i, j); the quirk only starts after it."""
    m = replacement_mapper("a b c d", "a ef c g", byte_tok)
    assert m[2, 2] == 0.5 and m[2, 3] == 0.5  # b -> e f
    assert m[3, 4] == 1  # c -> c, shifted by one
    assert m[4, 5] == 1  # d -> g, one to one
    assert m[5].sum() == 0 and all(m[k, k] == 1 for k in range(6, 77))
    source_maps = torch.rand(2, 16, 77)
    assert torch.allclose((source_maps @ m)[..., 4], source_maps[..., 3])


def test_replace_needs_same_word_count(byte_tok):
    with pytest.raises(ValueError, match=r"source has 3, the target 4.*refine"):
        replacement_mapper("a cat sits", "a big cat sits", byte_tok)


def test_replacement_mappers_stacks(bpe_tok):
    ms = replacement_mappers("a cat on a mat", ["a dog on a mat", "a tiger on a mat"], bpe_tok)
    assert ms.shape == (2, 77, 77)
    assert torch.equal(ms[1], replacement_mapper("a cat on a mat", "a tiger on a mat", bpe_tok))


# ---- refine -----------------------------------------------------------------------------------------


def test_refine_added_word(bpe_tok):
    mapper, alphas = refinement_mapper("a cat on a mat", "a big cat on a mat", bpe_tok)
    assert mapper.dtype == torch.int64 and alphas.dtype == torch.float32
    assert mapper[:8].tolist() == [0, 1, 0, 2, 3, 4, 5, 6]
    assert alphas[:8].tolist() == [1, 1, 0, 1, 1, 1, 1, 1]
    assert mapper[8:].tolist() == list(range(8, 77)) and bool((alphas[8:] == 1).all())


def test_refine_added_multi_token_word(byte_tok):
    mapper, alphas = refinement_mapper("a cat", "a big cat", byte_tok)
    # source: <s> a c a t </s>; target: <s> a b i g c a t </s>
    assert mapper[:9].tolist() == [0, 1, 0, 0, 0, 2, 3, 4, 5]
    assert (alphas[:9] == 0).nonzero().flatten().tolist() == [2, 3, 4]
    source, target = torch.rand(2, 16, 77), torch.rand(2, 16, 77)
    edited = source[..., mapper] * alphas + target * (1 - alphas)
    assert torch.equal(edited[..., 2:5], target[..., 2:5]) and torch.equal(edited[..., 5:8], source[..., 2:5])


def test_refine_ties_prefer_left_then_up_then_diag(byte_tok):
    # left before up: both "a" and "b" could be kept; left marks the last target token new first
    mapper, alphas = refinement_mapper("a b", "b a", byte_tok)
    assert mapper[:4].tolist() == [0, 2, 0, 3] and alphas[:4].tolist() == [1, 1, 0, 1]  # up first: [0, 0, 1, 3]
    # left before diag: the second "a" of the target is the new one
    mapper, alphas = refinement_mapper("a", "a a", byte_tok)
    assert mapper[:4].tolist() == [0, 1, 0, 2] and alphas[:4].tolist() == [1, 1, 0, 1]  # diag first: alphas 1, 0, 1, 1


def test_refinement_mappers_stacks(bpe_tok):
    mappers, alphas = refinement_mappers("a cat", ["a big cat", "a cat on a mat"], bpe_tok)
    assert mappers.shape == alphas.shape == (2, 77)
    assert alphas[1, :7].tolist() == [1, 1, 1, 0, 0, 0, 1]


def test_prompt_too_long(byte_tok):
    with pytest.raises(ValueError, match="over the 77 positions"):
        refinement_mapper("a", " ".join(["a"] * 80), byte_tok)


# ---- reweight ---------------------------------------------------------------------------------------


def test_equalizer(byte_tok, bpe_tok):
    eq = equalizer("a tiger on a mat", {"a": 0.5, "tiger": 2.0}, bpe_tok)
    expected = torch.ones(77)
    expected[[1, 5]], expected[[2, 3]] = 0.5, 2.0
    assert eq.dtype == torch.float32 and torch.equal(eq, expected)
    eq = equalizer("a cat", {1: 3.0}, byte_tok)
    assert eq[2:5].tolist() == [3.0] * 3 and eq.sum() == 74 + 9
    with pytest.raises(ValueError, match="'dog' is not in the prompt"):
        equalizer("a cat", {"dog": 2.0}, byte_tok)


# ---- time window ------------------------------------------------------------------------------------


def test_time_word_alpha_default_windows(bpe_tok):
    targets = ["a dog on a mat", "a tiger on a mat"]
    alpha = time_word_alpha(9, 0.5, "a cat on a mat", targets, bpe_tok)
    assert alpha.shape == (10, 2, 1, 1, 77)
    assert bool((alpha[:5] == 1).all()) and bool((alpha[5:] == 0).all())
    alpha = time_word_alpha(9, (0.2, 0.65), "a cat on a mat", targets, bpe_tok)  # rows int(2.0)..int(6.5)
    assert [bool((alpha[r] == 1).all()) for r in range(10)] == [r in (2, 3, 4, 5) for r in range(10)]
    assert int((alpha == 0).all(dim=(1, 2, 3, 4)).sum()) == 6


def test_time_word_alpha_per_word(bpe_tok):
    targets = ["a dog on a mat", "a tiger on a mat"]
    alpha = time_word_alpha(9, {"default_": 0.8, "tiger": (0.0, 0.3)}, "a cat on a mat", targets, bpe_tok)
    a = alpha[:, :, 0, 0]
    assert bool((a[:8, 0] == 1).all()) and bool((a[8:, 0] == 0).all())  # target without "tiger": default only
    others = [k for k in range(77) if k not in (2, 3)]
    assert bool((a[:8, 1, others] == 1).all()) and bool((a[8:, 1, others] == 0).all())
    assert a[:, 1, 2].tolist() == a[:, 1, 3].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    # no "default_": all tokens switch for every step
    alpha = time_word_alpha(4, {"tiger": 0.4}, "a cat on a mat", targets, bpe_tok)[:, :, 0, 0]
    assert bool((alpha[:, 0] == 1).all()) and alpha[:, 1, 2].tolist() == [1, 1, 0, 0, 0]


def test_time_word_alpha_errors(bpe_tok):
    with pytest.raises(ValueError, match="0 <= a <= b <= 1"):
        time_word_alpha(9, (0.8, 0.2), "a cat", ["a dog"], bpe_tok)
    with pytest.raises(ValueError, match="'horse' is in none of the target prompts"):
        time_word_alpha(9, {"horse": 0.5}, "a cat", ["a dog"], bpe_tok)
