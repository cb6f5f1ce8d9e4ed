"""Turn what the page sends (editor background, brush layers, an uploaded mask) into an
image and a binary mask, with the page's own checks and messages.

The brush paints on transparent layers of the same size as the image: every pixel a
stroke touched (alpha > 0) is masked. An uploaded mask (white = inpaint) is added to the
strokes. Sides that are not multiples of 8 are cropped at the right/bottom edge (at most
7 pixels, noted on the page) instead of refusing a photo straight from a camera.

A file the page could not read arrives as ``Unreadable`` (see ``components.py``) and is
refused here with the reason; images above ``MAX_PIXELS`` are refused before any model work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image

from attnctl.errors import InputError
from harmonpaint_recipe.inputs import PreparedInputs, mask_to_gray, prepare_inputs

#: smallest side accepted: 8 latent pixels, below which the UNet's 3 downsamplings leave nothing
MIN_SIDE = 64
#: most pixels accepted (2048 x 2048): bounds the server's memory and a run's time
MAX_PIXELS = 2048 * 2048


@dataclass(frozen=True)
class Unreadable:
    """A value the page could not convert: the raw value sent and why it failed."""

    value: Any
    reason: str


def too_large(width: int, height: int, what: str = "image") -> str | None:
    """The message for an image above ``MAX_PIXELS``, or None."""
    if width * height <= MAX_PIXELS:
        return None
    return (f"{what} is too large ({width}x{height} = {width * height:,} pixels); the app takes at most "
            f"{MAX_PIXELS:,} pixels (e.g. 2048x2048) - downscale it and upload it again")


def _readable(value: Any, what: str) -> Any:
    """``value``, or ``InputError`` naming ``what`` when the page could not read it."""
    if isinstance(value, Unreadable):
        raise InputError(f"{what}: {value.reason}")
    return value


def _layer_mask(layer: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """bool [H, W]: where a brush layer has paint."""
    if layer.size != size:  # layers follow the canvas; a mismatch only comes from odd clients
        layer = layer.resize(size, Image.NEAREST)
    rgba = np.asarray(layer.convert("RGBA"))
    return rgba[..., 3] > 0


def _uploaded_mask(mask: Image.Image, size: tuple[int, int], notes: list[str]) -> np.ndarray:
    """bool [H, W]: white (>= 0.5) pixels of an uploaded mask, resized to the image if needed."""
    if mask.size != size:
        notes.append(f"uploaded mask resized from {mask.size[0]}x{mask.size[1]} to {size[0]}x{size[1]} (nearest)")
        mask = mask.resize(size, Image.NEAREST)
    return np.asarray(mask_to_gray(mask), dtype=np.float32) >= 127.5


def editor_inputs(editor: Mapping[str, Any] | None, uploaded_mask: Image.Image | None = None) -> PreparedInputs:
    """Image and mask from the page, checked like ``prepare_inputs`` plus the page's rules.

    Args:
        editor: the image editor's value: ``background`` (PIL), ``layers`` (PIL RGBA list).
        uploaded_mask: an optional mask image, white = inpaint; added to the brush strokes.

    Raises:
        InputError: no image, an unreadable file, image smaller than ``MIN_SIDE`` or larger
            than ``MAX_PIXELS``, nothing painted or uploaded.
    """
    editor = _readable(editor, "image")
    if editor is not None and not isinstance(editor, Mapping):
        raise InputError("image: the editor sent no image data; upload an image into the editor")
    background = _readable((editor or {}).get("background"), "image")
    if background is None:
        raise InputError("no image: upload an image into the editor (drop a file on it or click it) first")
    w, h = background.size
    message = too_large(w, h)
    if message:
        raise InputError(message)
    image = background.convert("RGB")
    if w < MIN_SIDE or h < MIN_SIDE:
        raise InputError(
            f"image is too small ({w}x{h}); it needs at least {MIN_SIDE}x{MIN_SIDE} pixels - upload a larger image"
        )
    notes: list[str] = []
    painted = np.zeros((h, w), dtype=bool)
    for layer in (editor or {}).get("layers") or []:
        layer = _readable(layer, "brush layer")
        if layer is not None:
            message = too_large(*layer.size, what="brush layer")
            if message:
                raise InputError(message)
            painted |= _layer_mask(layer, (w, h))
    uploaded_mask = _readable(uploaded_mask, "uploaded mask")
    if uploaded_mask is not None:
        message = too_large(*uploaded_mask.size, what="uploaded mask")
        if message:
            raise InputError(message)
        painted |= _uploaded_mask(uploaded_mask, (w, h), notes)
    if not painted.any():
        raise InputError(
            "no mask: paint over the region to inpaint with the brush (or upload a mask, white = inpaint)"
        )
    cw, ch = w // 8 * 8, h // 8 * 8
    if (cw, ch) != (w, h):
        notes.append(f"image cropped from {w}x{h} to {cw}x{ch} (sides must be multiples of 8)")
        image = image.crop((0, 0, cw, ch))
        painted = painted[:ch, :cw]
        if not painted.any():
            raise InputError("no mask left after cropping to multiples of 8: paint inside the image, away from its edge")
    mask = Image.fromarray(painted.astype(np.uint8) * 255)
    prepared = prepare_inputs(image, mask, warn=False)
    prepared.notes[:0] = notes
    return prepared
