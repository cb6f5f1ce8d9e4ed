"""Page components that hand what Gradio cannot convert to the app's own checks.

Gradio converts each value before a handler sees it. A file that is not an image, text in a
number box, or a recipe that is not offered fail there, and the client gets a bare "Error".
These components (Gradio templates: the same widgets and front end) return ``Unreadable``
(the raw value and the reason) instead, so the status line names the input and the fix as it
does for every other bad input. Image components also read each image's size from its header
before Gradio decodes it, so a small file that unpacks to a huge image is refused without
being decoded.
"""

from __future__ import annotations

import io
import re
from abc import ABCMeta
from typing import Any, Iterator

import gradio as gr
from PIL import Image

from harmonpaint_recipe.app.editor import MAX_PIXELS, Unreadable, too_large


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _image_sources(component: Any, payload: Any) -> Iterator[Any]:
    """Every file path or byte string of an image payload (one image, or the editor's layers)."""
    blobs = getattr(component, "blob_storage", None)
    if getattr(payload, "id", None) and blobs is not None and blobs.get(payload.id) is not None:
        payload = blobs.get(payload.id)  # the editor's layers sent as blobs
    parts = [payload]
    if hasattr(payload, "background"):
        parts = [payload.background, *(payload.layers or []), payload.composite]
    for part in parts:
        if isinstance(part, (bytes, bytearray)):
            yield bytes(part)
        elif getattr(part, "path", None):
            yield part.path


def _oversized(component: Any, payload: Any) -> str | None:
    """The message for the first image of ``payload`` above ``MAX_PIXELS``, or None (header only)."""
    for source in _image_sources(component, payload):
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                size = image.size
        except Image.DecompressionBombError:  # past PIL's own limit, far past ours
            return (f"image is too large (more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels); the app takes at most "
                    f"{MAX_PIXELS:,} pixels (e.g. 2048x2048) - downscale it and upload it again")
        except Exception:  # not an image: the component's own conversion says why
            continue
        message = too_large(*size)
        if message:
            return message
    return None


def _lenient_preprocess(component: Any, base: type, payload: Any, images: bool) -> Any:
    """``base.preprocess`` of ``payload``, or ``Unreadable`` with the reason it failed."""
    if images and payload is not None:
        message = _oversized(component, payload)
        if message:
            return Unreadable(None, message)
    try:
        return base.preprocess(component, payload)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = re.sub(r" ?'/[^']*'", "", reason)  # the server's own paths say nothing to the client
        if images:
            return Unreadable(payload, f"the uploaded file cannot be read as an image ({reason}); upload a PNG, "
                                       "JPEG or WebP image")
        return Unreadable(payload, f"value {_short(payload)} is not accepted here ({reason})")


class _NoStub(type(gr.Number)):
    """Gradio's component metaclass, without the ``.pyi`` stub it writes next to the module of
    every component class: the classes here add no events and no ``__init__`` (all it handles
    besides), and nothing is written into the installed package."""

    def __new__(mcs, name: str, bases: tuple[type, ...], attrs: dict[str, Any]) -> type:
        return ABCMeta.__new__(mcs, name, bases, attrs)


class ImageEditor(gr.ImageEditor, metaclass=_NoStub):
    """``gr.ImageEditor`` whose unreadable or oversized images arrive as ``Unreadable``."""

    is_template = True  # drawn with gr.ImageEditor's front end

    def preprocess(self, payload: Any) -> Any:
        return _lenient_preprocess(self, gr.ImageEditor, payload, images=True)


class ImageInput(gr.Image, metaclass=_NoStub):
    """``gr.Image`` whose unreadable or oversized images arrive as ``Unreadable``."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return _lenient_preprocess(self, gr.Image, payload, images=True)


class Number(gr.Number, metaclass=_NoStub):
    """``gr.Number`` whose unconvertible values arrive as ``Unreadable``."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return _lenient_preprocess(self, gr.Number, payload, images=False)


class Dropdown(gr.Dropdown, metaclass=_NoStub):
    """``gr.Dropdown`` whose choices not offered arrive as ``Unreadable`` (the app names the offered ones)."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return _lenient_preprocess(self, gr.Dropdown, payload, images=False)


class Radio(gr.Radio, metaclass=_NoStub):
    """``gr.Radio`` whose choices not offered arrive as ``Unreadable``."""

    is_template = True

    def preprocess(self, payload: Any) -> Any:
        return _lenient_preprocess(self, gr.Radio, payload, images=False)


def plain(value: Any) -> Any:
    """The raw value of a scalar control (what the client sent, for the app's checks to judge)."""
    return value.value if isinstance(value, Unreadable) else value
