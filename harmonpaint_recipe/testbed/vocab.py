"""The testbed's word vocabulary: every word a caption of the world can use."""

from __future__ import annotations

from harmonpaint_recipe.testbed.world import COLOUR_NAMES, SHAPES, STYLES

#: function words of the captions "a red circle" and "a red circle in stripes style"
FUNCTION_WORDS: tuple[str, ...] = ("a", "in", "style")

#: every caption word, in a fixed order (token ids follow it)
WORDS: tuple[str, ...] = FUNCTION_WORDS + COLOUR_NAMES + SHAPES + STYLES


def parse_object(prompt: str) -> tuple[str | None, str | None]:
    """The colour and shape a prompt asks for (``None`` where it names none).

    The first colour word and the first shape word count, wherever they are.
    """
    words = prompt.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOUR_NAMES), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape
