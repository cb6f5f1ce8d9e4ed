"""Opening a strategy's image setting (a reference or source image) at plan time."""

from __future__ import annotations

from typing import Any

from attnctl.errors import InputError


def open_image(path: str, setting: str) -> Any:
    """The RGB image at ``path``, read now, so a bad path fails at attach time naming ``setting``
    (e.g. ``strategies.ref.image``)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise InputError(f"{setting}: cannot read '{path}': {exc}; give the path of an image file (PNG, JPEG, ...)") from None
