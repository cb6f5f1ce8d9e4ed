"""Prompt-to-Prompt's token bookkeeping (Hertz et al. 2022): word positions, the replace mapper
(word swap), the refine mapper and alphas (words added), the reweight equalizer and the per-step,
per-word switch between source and target maps. Positions index the sequence padded to ``max_len``
(start token at 0); the tokenizer is CLIP-style (``encode`` adds start/end tokens, ``decode`` ids).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import torch

#: a step window: ``b`` (the window (0, b)) or ``(a, b)``, as fractions of the denoising steps
Window = Union[float, tuple[float, float]]
_LEFT, _UP, _DIAG = 1, 2, 3


def _encode(text: str, tokenizer: Any, max_len: int) -> list[int]:
    """Token ids of ``text`` with start and end tokens; ValueError if it does not fit ``max_len``."""
    ids = list(tokenizer.encode(text))
    if len(ids) > max_len:
        raise ValueError(f"prompt {text!r} is {len(ids)} tokens, over the {max_len} positions available; shorten it")
    return ids


def word_token_positions(text: str, word: str | int, tokenizer: Any) -> list[int]:
    """Sequence positions (start token = 0) of the tokens of ``word`` in ``text``.

    ``word`` is a string (every occurrence among ``text.split(" ")``) or an int (the index of
    a word in that split). Tokens are decoded one by one and accumulated until they spell the
    current word, which maps words to tokens without knowing the tokenizer's vocabulary.
    """
    words = text.split(" ")
    if isinstance(word, str):
        wanted = {k for k, w in enumerate(words) if w == word}
    elif 0 <= word < len(words):
        wanted = {word}
    else:
        raise ValueError(f"word index {word} is out of range: {text!r} has {len(words)} words (0..{len(words) - 1})")
    if not wanted:
        return []
    out, k, spelled = [], 0, ""
    for pos, token_id in enumerate(tokenizer.encode(text)[1:-1], start=1):
        while k < len(words) and not words[k]:  # a double space splits off an empty word, which has no tokens
            k += 1
        if k == len(words):
            break
        if k in wanted:
            out.append(pos)
        spelled += tokenizer.decode([token_id]).replace("</w>", "").strip()
        # the word is spelled out; compared by length as the tokenizer lowercases and may normalise characters
        if len(spelled) >= len(words[k]):
            k, spelled = k + 1, ""
    return out


def replacement_mapper(source: str, target: str, tokenizer: Any, max_len: int = 77) -> torch.Tensor:
    """[max_len, max_len] float32 M for a word swap: ``A_target = A_source @ M`` over the token axis.

    The prompts must have the same number of space-separated words; those that differ are replaced.
    """
    src_words, tgt_words = source.split(" "), target.split(" ")
    if len(src_words) != len(tgt_words):
        raise ValueError(f"replace needs prompts with the same number of words: the source has {len(src_words)}, "
                         f"the target {len(tgt_words)}; use refine for prompts that add or drop words")
    for text in (source, target):
        _encode(text, tokenizer, max_len)
    changed = [k for k, (a, b) in enumerate(zip(src_words, tgt_words)) if a != b]
    spans = [(word_token_positions(source, k, tokenizer), word_token_positions(target, k, tokenizer)) for k in changed]
    spans = [(s, t) for s, t in spans if s and t]  # a word without tokens (an empty word) has nothing to map
    m = torch.zeros(max_len, max_len)
    i = j = n = 0
    while i < max_len and j < max_len:
        if n < len(spans) and spans[n][0][0] == i:  # at a replaced word: map its tokens as a block
            s, t = spans[n]
            if len(s) == len(t):  # token k of the source word becomes token k of the target word
                m[s, t] = 1.0
            else:  # otherwise each source token spreads evenly over the target word's tokens
                m[torch.tensor(s)[:, None], torch.tensor(t)[None, :]] = 1.0 / len(t)
            i, j, n = i + len(s), j + len(t), n + 1
        else:
            # before the last replaced word a token keeps its map (i, j); after it the authors
            # write (j, j), not (i, j): kept to reproduce their maps when token counts differ
            m[i if n < len(spans) else j, j] = 1.0
            i, j = i + 1, j + 1
    return m


def replacement_mappers(source: str, targets: Sequence[str], tokenizer: Any, max_len: int = 77) -> torch.Tensor:
    """``replacement_mapper`` for each target, stacked: [len(targets), max_len, max_len]."""
    return torch.stack([replacement_mapper(source, t, tokenizer, max_len) for t in targets])


def _align(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """Global (Needleman-Wunsch) alignment of y to x: per position of y, its position in x or -1 (new)."""
    gap, match, mismatch = 0, 1, -1  # free gaps: the alignment is a longest common subsequence
    score = [[(i + j) * gap if i == 0 or j == 0 else 0 for j in range(len(y) + 1)] for i in range(len(x) + 1)]
    move = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left, up = score[i][j - 1] + gap, score[i - 1][j] + gap
            diag = score[i - 1][j - 1] + (match if x[i - 1] == y[j - 1] else mismatch)
            score[i][j] = best = max(left, up, diag)
            # ties prefer left, then up, then diag: the authors' order, which decides equal-score alignments
            move[i][j] = _LEFT if best == left else _UP if best == up else _DIAG
    out, i, j = [-1] * len(y), len(x), len(y)
    while i > 0 or j > 0:
        step = _LEFT if i == 0 else _UP if j == 0 else move[i][j]  # on a border only one axis is left to walk
        if step == _DIAG:  # target token j-1 is source token i-1
            i, j = i - 1, j - 1
            out[j] = i
        elif step == _LEFT:  # target token j-1 is new: it keeps -1
            j -= 1
        else:  # source token i-1 has no counterpart in the target
            i -= 1
    return out


def refinement_mapper(source: str, target: str, tokenizer: Any, max_len: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """(mapper LongTensor [max_len], alphas FloatTensor [max_len]) for a refine edit (words added).

    ``A_target[..., j] = A_source[..., mapper[j]] * alphas[j] + A_target[..., j] * (1 - alphas[j])``.
    """
    x, y = _encode(source, tokenizer, max_len), _encode(target, tokenizer, max_len)
    base = torch.tensor(_align(x, y), dtype=torch.int64)
    alphas = torch.ones(max_len)
    alphas[: len(y)] = (base != -1).float()  # new target tokens keep their own maps
    mapper = torch.arange(max_len, dtype=torch.int64)  # after the encoded target: identity, as the authors do
    mapper[: len(y)] = base.clamp(min=0)  # -1 -> 0: any valid index, its weight is alphas = 0
    return mapper, alphas


def refinement_mappers(source: str, targets: Sequence[str], tokenizer: Any,
                       max_len: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """``refinement_mapper`` for each target, stacked: ([len(targets), max_len], [len(targets), max_len])."""
    pairs = [refinement_mapper(source, t, tokenizer, max_len) for t in targets]
    return torch.stack([m for m, _ in pairs]), torch.stack([a for _, a in pairs])


def equalizer(text: str, words_and_weights: Mapping[str | int, float], tokenizer: Any,
              max_len: int = 77) -> torch.Tensor:
    """[max_len] float32 reweighting of ``text``'s tokens: 1 everywhere, each word's weight at its tokens."""
    _encode(text, tokenizer, max_len)
    eq = torch.ones(max_len)
    for word, weight in words_and_weights.items():
        positions = word_token_positions(text, word, tokenizer)
        if not positions:
            raise ValueError(f"reweight: word {word!r} is not in the prompt {text!r} (words: {text.split(' ')})")
        eq[positions] = float(weight)
    return eq


def _rows(value: Window, rows: int, what: str) -> slice:
    """The step rows of a window: int(a * rows) inclusive to int(b * rows) exclusive."""
    pair = (0.0, value) if isinstance(value, (int, float)) else tuple(value)
    if len(pair) != 2 or not 0.0 <= pair[0] <= pair[1] <= 1.0:
        raise ValueError(f"{what}: window {value!r} must be b or (a, b) with 0 <= a <= b <= 1")
    return slice(int(pair[0] * rows), int(pair[1] * rows))


def time_word_alpha(num_steps: int, cross_replace_steps: Window | Mapping[str, Window], source: str,
                    targets: Sequence[str], tokenizer: Any, max_len: int = 77) -> torch.Tensor:
    """[num_steps + 1, len(targets), 1, 1, max_len]: 1 where a target's cross-attention takes the edited map.

    ``cross_replace_steps`` is a window for all tokens, or a dict with ``"default_"`` (that
    window; (0, 1) if absent) and words, each with its own window at its tokens in each target.
    ``source`` is not read: the switch concerns target tokens only.
    """
    rows = num_steps + 1
    spec = dict(cross_replace_steps) if isinstance(cross_replace_steps, Mapping) else {"default_": cross_replace_steps}
    alpha = torch.zeros(rows, len(targets), max_len)
    alpha[_rows(spec.pop("default_", (0.0, 1.0)), rows, "cross_replace_steps.default_")] = 1.0
    for word, value in spec.items():
        window, found = _rows(value, rows, f"cross_replace_steps.{word}"), False
        for p, target in enumerate(targets):
            positions = [q for q in word_token_positions(target, word, tokenizer) if q < max_len]
            if positions:  # a word's own window replaces the default at its tokens
                alpha[:, p, positions] = 0.0
                alpha[window, p, positions] = 1.0
                found = True
        if not found:
            raise ValueError(f"cross_replace_steps: word {word!r} is in none of the target prompts {list(targets)}")
    return alpha.reshape(rows, len(targets), 1, 1, max_len)
