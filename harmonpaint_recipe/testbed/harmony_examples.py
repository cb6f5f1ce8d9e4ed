"""Ground-truth examples for the harmony judge: does the masked region continue the background?

A styled object continues the background's texture field ``t(x, y)`` through the object, in
shades of the object's colour (:mod:`.world`). Every example here is a scene of the world
with its object drawn one way, labelled by whether the object carries *the background's*
pattern:

=================  =====  ===========================================================
kind               label  object drawn as
=================  =====  ===========================================================
``styled``         yes    the background's field in the object's shades (the truth)
``flat``           no     plain colour (the paste HarmonPaint is meant to avoid)
``wrong_style``    no     another style's field (stripes object on a dots background)
``noise_texture``  no     per-pixel random texture in the object's shades
``smooth``         no     a smooth ramp between the object's shades, no pattern
``blurred``        no     the styled object with its pattern blurred away
``blotches``       no     blotches of several random colours (a decoder's garbage)
``blotched_mask``  no     the whole mask filled with such blotches, the object on top
=================  =====  ===========================================================

Pixel noise is added on top, as a batch augmentation (:func:`add_noise`): a flat object
with Gaussian noise inside the mask or over the whole image is still a flat object; a
styled object with noise over the whole image still continues its background. The kinds
the judge is *not* trained on (``CONTROL_KINDS``: the same style with other parameters,
uniform and salt-and-pepper noise) serve as held-out controls.
"""

from __future__ import annotations

import numpy as np

from attnctl.errors import InputError
from harmonpaint_recipe.testbed.world import (
    STYLES,
    Scene,
    object_coverage,
    object_shades,
    render,
    sample_scene,
    scene_mask,
    texture_field,
)

POSITIVE_KINDS: tuple[str, ...] = ("styled",)
NEGATIVE_KINDS: tuple[str, ...] = ("flat", "wrong_style", "noise_texture", "smooth", "blurred", "blotches",
                                   "blotched_mask")
#: kinds used only to check the judge, never to fit it
CONTROL_KINDS: tuple[str, ...] = ("same_style_other_params", "uniform_noise", "salt_pepper")
KINDS: tuple[str, ...] = POSITIVE_KINDS + NEGATIVE_KINDS + CONTROL_KINDS


def _fill_with_field(scene: Scene, field: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """The scene's background with the object drawn as ``field`` (in [0, 1]) mapped to the object's shades."""
    background = render(scene, "background").astype(np.float32) / 255.0
    at0, at1 = object_shades(scene)
    fill = at0 + (at1 - at0) * field[..., None]
    alpha = coverage[..., None]
    return (np.clip(background * (1 - alpha) + fill * alpha, 0, 1) * 255 + 0.5).astype(np.uint8)


def _other_field(scene: Scene, rng: np.random.Generator, same_style: bool) -> np.ndarray:
    """A texture field from another scene: of the same style with other parameters, or of another style."""
    style = scene.style if same_style else str(rng.choice([s for s in STYLES if s != scene.style]))
    other = sample_scene(int(rng.integers(0, 2**31 - 1)), scene.split, style=style)
    return texture_field(other.style, other.texture)


def _box_blur(field: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(field, radius, mode="edge")
    cumulative = padded.cumsum(0).cumsum(1)
    cumulative = np.pad(cumulative, ((1, 0), (1, 0)))
    k = 2 * radius + 1
    h, w = field.shape
    total = cumulative[k:k + h, k:k + w] - cumulative[:h, k:k + w] - cumulative[k:k + h, :w] + cumulative[:h, :w]
    return (total / (k * k)).astype(np.float32)


def _blotches(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """``[H, W, 3]`` in [0, 1]: regions of 3-6 random colours, each region where one of as many
    random coarse fields (cells of 2-6 pixels, bilinear) is largest."""
    h, w = shape
    cell = int(rng.integers(2, 7))
    k = int(rng.integers(3, 7))
    small = rng.random((k, h // cell + 2, w // cell + 2)).astype(np.float32)
    ys, xs = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    fields = (small[:, y0][:, :, x0] * (1 - fy) * (1 - fx) + small[:, y0 + 1][:, :, x0] * fy * (1 - fx)
              + small[:, y0][:, :, x0 + 1] * (1 - fy) * fx + small[:, y0 + 1][:, :, x0 + 1] * fy * fx)
    colours = rng.random((k, 3)).astype(np.float32)
    return colours[fields.argmax(axis=0)]


def render_example(scene: Scene, kind: str, rng: np.random.Generator,
                   coverage: np.ndarray | None = None) -> np.ndarray:
    """The scene with its object drawn as ``kind`` (see the module docstring), ``[H, W, 3]`` uint8."""
    coverage = object_coverage(scene) if coverage is None else coverage
    if kind == "styled":
        return render(scene, "styled", coverage)
    if kind == "flat":
        return render(scene, "flat", coverage)
    h, w = coverage.shape
    if kind in ("wrong_style", "same_style_other_params"):
        field = _other_field(scene, rng, same_style=kind == "same_style_other_params")
    elif kind == "noise_texture":
        cell = int(rng.integers(1, 3))
        small = rng.random((h // cell + 1, w // cell + 1)).astype(np.float32)
        field = np.kron(small, np.ones((cell, cell), np.float32))[:h, :w]
    elif kind == "smooth":
        angle = rng.uniform(0, 2 * np.pi)
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        ramp = x * np.cos(angle) + y * np.sin(angle)
        field = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    elif kind == "blurred":
        field = _box_blur(texture_field(scene.style, scene.texture), int(rng.integers(5, 8)))
    elif kind in ("blotches", "blotched_mask"):
        image = render(scene, "flat" if kind == "blotched_mask" else "background", coverage).astype(np.float32) / 255.0
        where = (scene_mask(scene, coverage) > 0).astype(np.float32) if kind == "blotched_mask" else coverage
        blotches = _blotches((h, w), rng)
        if kind == "blotched_mask":  # garbage around a (partly visible) object: the object stays on top
            where = where * (1 - coverage * rng.uniform(0.5, 1.0))
        mixed = image * (1 - where[..., None]) + blotches * where[..., None]
        return (np.clip(mixed, 0, 1) * 255 + 0.5).astype(np.uint8)
    elif kind in ("uniform_noise", "salt_pepper"):
        base = render(scene, "flat", coverage).astype(np.float32)
        if kind == "uniform_noise":
            base += rng.uniform(-40, 40, size=base.shape)
        else:
            flips = rng.random((h, w)) < 0.15
            base[flips] = rng.choice([0.0, 255.0], size=(int(flips.sum()), 1))
        region = (scene_mask(scene, coverage) > 0)[..., None]
        return np.where(region, np.clip(base, 0, 255), render(scene, "flat", coverage)).round().astype(np.uint8)
    else:
        raise InputError(f"example kind '{kind}' is not one of {', '.join(KINDS)}")
    return _fill_with_field(scene, field, coverage)


def add_noise(image: np.ndarray, mask: np.ndarray, sigma: float, where: str, rng: np.random.Generator) -> np.ndarray:
    """``image`` with Gaussian noise of ``sigma`` levels (0-255) added ``where`` = ``mask`` or ``all``."""
    if where not in ("mask", "all"):
        raise InputError(f"noise 'where' must be 'mask' or 'all', got '{where}'")
    noise = rng.normal(0.0, sigma, size=image.shape)
    if where == "mask":
        noise *= (np.asarray(mask) > 0)[..., None]
    return np.clip(image.astype(np.float64) + noise, 0, 255).round().astype(np.uint8)

