"""Checks of what a page request sends besides images: seed and prompt.

Each bad value becomes an ``InputError`` that names the input and the fix; the page shows
it in the status line. A prompt longer than the text encoder's window is accepted with a
note (the pipeline truncates it), one past ``MAX_PROMPT_CHARS`` is refused.
"""

from __future__ import annotations

import unicodedata
from typing import Any

from attnctl.errors import InputError

#: seeds accepted from the page (what torch's CPU generator and numpy both take)
MAX_SEED = 2**32 - 1
#: longest prompt accepted: the text encoder reads 77 tokens (a few hundred characters)
MAX_PROMPT_CHARS = 2000
#: control characters a prompt may hold (a pasted multi-line prompt)
ALLOWED_CONTROLS = "\n\t"


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_seed(seed: Any) -> int:
    """The seed as an int in 0..MAX_SEED; ``InputError`` otherwise."""
    try:
        value = float(seed)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"seed: enter a whole number from 0 to {MAX_SEED} (or click 'new seed'), "
                         f"got {_shown(seed)}") from None
    if isinstance(seed, bool) or not value.is_integer() or not 0 <= value <= MAX_SEED:
        raise InputError(f"seed: enter a whole number from 0 to {MAX_SEED} (or click 'new seed'), got {_shown(seed)}")
    return int(value)


def check_prompt(prompt: Any) -> str:
    """The prompt as text (``None`` is empty); ``InputError`` for non-text, control characters or a huge one."""
    if prompt is None:
        return ""
    if not isinstance(prompt, str):
        raise InputError(f"prompt: expected text, got {_shown(prompt)}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(
            f"prompt is {len(prompt):,} characters long; the text encoder reads only its first 77 tokens (a few "
            f"hundred characters) - shorten it to at most {MAX_PROMPT_CHARS:,} characters"
        )
    for position, char in enumerate(prompt, start=1):
        if unicodedata.category(char) == "Cc" and char not in ALLOWED_CONTROLS:
            raise InputError(
                f"prompt holds the control character U+{ord(char):04X} at position {position}; remove it "
                "(paste the prompt as plain text)"
            )
    return prompt


def prompt_note(tokenizer: Any, prompt: str) -> str | None:
    """A note when ``prompt`` is longer than the text encoder's window (the rest is ignored), else None."""
    window = int(getattr(tokenizer, "model_max_length", 77))
    if window <= 0 or window > 100_000:  # a tokenizer without a real window: nothing to say
        return None
    count = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
    if count <= window:
        return None
    return (f"the prompt is {count} tokens long; the text encoder reads the first {window} (start and end "
            f"tokens included), the rest is ignored")
