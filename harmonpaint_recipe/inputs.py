"""Load and check an inpainting image and mask before any model work is done.

Every problem is found here, early, with a message that names the input and the fix.
The mask convention is the spec's: white (>= 0.5) marks the region to inpaint; the mask
is binarized at 0.5 and handed to both the pipeline and the attention controller, so
both see exactly the same region.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from attnctl.errors import InputError

#: above this masked fraction the unmasked "style source" is too small (paper Fig. 11)
MAX_MASK_FRACTION = 0.9


class InputWarning(UserWarning):
    """A user input was accepted but adjusted or is likely to give poor results."""


@dataclass
class PreparedInputs:
    """An RGB image and its binary mask (``L``, 0/255), same size, sides multiples of 8."""

    image: Image.Image
    mask: Image.Image
    mask_array: np.ndarray  # float32 [H, W], 1 = inpaint
    notes: list[str]


def open_image(source: str | Path | Image.Image, what: str) -> Image.Image:
    """Open ``source`` (path or PIL image) fully; ``InputError`` naming ``what`` on failure."""
    if isinstance(source, Image.Image):
        return source
    path = Path(source)
    if not path.exists():
        raise InputError(f"{what} file '{path}' does not exist; check the path")
    if not path.is_file():
        raise InputError(f"{what} '{path}' is not a file; give the path of a PNG or JPEG image")
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(
            f"{what} file '{path}' cannot be read as an image; "
            "it may be corrupt or not an image - re-export it as PNG or JPEG"
        ) from None


def mask_to_gray(mask: Image.Image) -> Image.Image:
    """Single-channel mask; RGBA uses alpha only when the colour channels carry nothing."""
    if mask.mode in ("L", "1"):
        return mask.convert("L")
    if mask.mode in ("I", "I;16", "F"):
        arr = np.asarray(mask, dtype=np.float64)
        peak = arr.max() or 1.0
        return Image.fromarray((arr / peak * 255).round().astype(np.uint8))
    if mask.mode in ("RGBA", "LA", "PA"):
        rgba = mask.convert("RGBA")
        rgb = np.asarray(rgba.convert("RGB"))
        if rgb.max() == rgb.min():  # flat colour: the mask is drawn in the alpha channel
            return rgba.getchannel("A")
    return mask.convert("L")


def prepare_inputs(
    image: str | Path | Image.Image,
    mask: str | Path | Image.Image,
    resize_mask: bool = False,
    warn: bool = True,
) -> PreparedInputs:
    """Open and check an image and mask.

    Args:
        image: path or PIL image; converted to RGB.
        mask: path or PIL image; several channels are converted to one (``L``); white
            marks the region to inpaint; non-binary values are binarized at 0.5.
        resize_mask: resize a mask of another size to the image (nearest) instead of failing.
        warn: emit ``InputWarning`` for adjusted inputs (the notes are returned either way).

    Raises:
        InputError: missing/unreadable file, size mismatch, side not a multiple of 8, empty mask.
    """
    img = open_image(image, "image")
    msk = open_image(mask, "mask")
    notes: list[str] = []
    w, h = img.size
    if w % 8 or h % 8:
        fix_w, fix_h = max(8, w // 8 * 8), max(8, h // 8 * 8)
        raise InputError(
            f"image is {w}x{h}, but Stable Diffusion needs width and height that are multiples of 8; "
            f"crop or resize it, e.g. to {fix_w}x{fix_h}"
        )
    if msk.size != img.size:
        if not resize_mask:
            raise InputError(
                f"mask is {msk.size[0]}x{msk.size[1]} but the image is {w}x{h}; give a mask of the "
                "same size, or pass --resize-mask (resize_mask=True) to resize it (nearest)"
            )
        notes.append(f"mask resized from {msk.size[0]}x{msk.size[1]} to {w}x{h} (nearest)")
        msk = msk.resize((w, h), Image.NEAREST)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if msk.mode not in ("L", "1"):
        notes.append(f"mask has mode {msk.mode}; converted to one channel (L)")
    gray = np.asarray(mask_to_gray(msk), dtype=np.float32) / 255.0
    binary = (gray >= 0.5).astype(np.float32)
    if np.any((gray > 0) & (gray < 1)):
        notes.append("mask is not binary; binarized at 0.5 (white = inpaint)")
    fraction = float(binary.mean())
    if fraction == 0.0:
        raise InputError(
            "mask is empty: no pixel is >= 0.5, so there is nothing to inpaint; "
            "paint the region to inpaint white (255) on black"
        )
    if fraction > MAX_MASK_FRACTION:
        notes.append(
            f"mask covers {fraction:.0%} of the image (> {MAX_MASK_FRACTION:.0%}): the unmasked style "
            "source is too small and harmonization will be weak (paper Fig. 11)"
        )
    if warn:
        for note in notes:
            warnings.warn(note, InputWarning, stacklevel=2)
    mask_img = Image.fromarray((binary * 255).astype(np.uint8))
    return PreparedInputs(image=img, mask=mask_img, mask_array=binary, notes=notes)
