"""The testbed world: procedural scenes of one object on a stylized background.

A scene is drawn from a seed alone (``sample_scene(seed, split)``), so the same seed always
gives the same pixels, mask and caption. A scene has

- a background *style* (``STYLES``): a texture field ``t(x, y)`` in [0, 1] (stripes, checks,
  dots, noise, blobs, waves) shown in the style's own two-colour palette;
- an *object*: one of ``SHAPES`` in one of ``COLOURS``, at a random position and size;
- a *mask* around the object: its bounding box or its dilated silhouette, with a random margin.

The object is rendered in one of two ways, and the caption says which:

- ``flat``: plain colour -- caption ``"a red circle"`` (the object alone);
- ``styled``: the background's texture field continued through the object, in a dark and a
  light shade of the object's colour -- caption ``"a red circle in stripes style"``.

A model trained on these pairs paints a flat object when the prompt names only the object,
which is the disharmony HarmonPaint is meant to remove without retraining.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from attnctl.errors import InputError

IMAGE_SIZE = 64

#: background styles with their palettes (texture value 0 -> first colour, 1 -> second)
STYLE_PALETTES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "stripes": ((0.55, 0.42, 0.30), (0.93, 0.87, 0.74)),
    "checks": ((0.30, 0.38, 0.44), (0.80, 0.83, 0.86)),
    "dots": ((0.90, 0.82, 0.80), (0.48, 0.33, 0.38)),
    "noise": ((0.33, 0.42, 0.33), (0.80, 0.86, 0.74)),
    "blobs": ((0.86, 0.80, 0.68), (0.36, 0.32, 0.50)),
    "waves": ((0.22, 0.42, 0.48), (0.80, 0.90, 0.87)),
}
STYLES: tuple[str, ...] = tuple(STYLE_PALETTES)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.88, 0.12, 0.12),
    "green": (0.12, 0.68, 0.18),
    "blue": (0.14, 0.28, 0.92),
    "yellow": (0.96, 0.84, 0.08),
    "purple": (0.62, 0.16, 0.78),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
MASK_KINDS: tuple[str, ...] = ("box", "shape")
RENDER_MODES: tuple[str, ...] = ("flat", "styled", "background")
SPLITS: tuple[str, ...] = ("train", "eval", "judge", "calibrate", "demo")

#: shades of the object colour used by the styled rendering (texture 0 -> dark, 1 -> light)
_DARK, _LIGHT = 0.5, 0.45

Mode = Literal["flat", "styled", "background"]


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one scene; produced by :func:`sample_scene`."""

    seed: int
    split: str
    style: str
    palette: tuple[tuple[float, float, float], tuple[float, float, float]]
    texture: dict = field(hash=False)
    shape: str
    colour: str
    center: tuple[float, float]  # (x, y) in pixels
    size: float  # object extent in pixels
    angle: float  # degrees, small
    mask_kind: str
    margin: int  # pixels around the bounding box / silhouette
    styled: bool  # the training target of this scene: styled (True) or flat (False)

    @property
    def object_words(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.shape}"

    def caption(self, with_style: bool | None = None) -> str:
        """``"a red circle"`` or ``"a red circle in stripes style"`` (default: as ``styled``)."""
        with_style = self.styled if with_style is None else with_style
        text = f"a {self.object_words}"
        return f"{text} in {self.style} style" if with_style else text


def _rng(seed: int, split: str) -> np.random.Generator:
    if split not in SPLITS:
        raise InputError(f"split '{split}' is not one of {', '.join(SPLITS)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    # each split draws from its own stream, so eval scenes never repeat training scenes
    digest = hashlib.sha256(f"{split}:{int(seed)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _texture_params(style: str, rng: np.random.Generator) -> dict:
    if style == "stripes":
        return {"angle": float(rng.choice([0, 45, 90, 135]) + rng.uniform(-10, 10)),
                "period": float(rng.uniform(9, 14)), "phase": float(rng.uniform(0, 2 * np.pi))}
    if style == "checks":
        return {"cell": float(rng.uniform(5, 7.5)), "ox": float(rng.uniform(0, 16)), "oy": float(rng.uniform(0, 16))}
    if style == "dots":
        spacing = float(rng.uniform(10, 14))
        return {"spacing": spacing, "radius": float(rng.uniform(0.30, 0.37) * spacing),
                "ox": float(rng.uniform(0, spacing)), "oy": float(rng.uniform(0, spacing))}
    if style == "noise":
        cell = float(rng.uniform(4, 6))
        n = int(np.ceil(IMAGE_SIZE / cell)) + 3
        return {"cell": cell, "grid": rng.uniform(0, 1, size=(n, n)).round(4).tolist()}
    if style == "blobs":
        count = int(rng.integers(44, 56))
        return {"strokes": [
            [float(rng.uniform(-4, IMAGE_SIZE + 4)), float(rng.uniform(-4, IMAGE_SIZE + 4)),
             float(rng.uniform(0, np.pi)), float(rng.uniform(4, 8)), float(rng.uniform(2.0, 3.2))]
            for _ in range(count)
        ]}
    if style == "waves":
        return {"angle": float(rng.choice([0, 90]) + rng.uniform(-15, 15)), "period": float(rng.uniform(10, 14)),
                "amplitude": float(rng.uniform(2, 4)), "wavelength": float(rng.uniform(18, 30)),
                "phase": float(rng.uniform(0, 2 * np.pi))}
    raise InputError(f"style '{style}' is not one of {', '.join(STYLES)}")


def sample_scene(
    seed: int,
    split: str = "train",
    *,
    mask_kind: str | None = None,
    styled: bool | None = None,
    style: str | None = None,
    shape: str | None = None,
    colour: str | None = None,
) -> Scene:
    """Draw scene ``seed`` of ``split``; keyword arguments pin one attribute (the rest of the
    draw is unchanged, so pinning never shifts the other attributes)."""
    rng = _rng(seed, split)
    drawn_style = STYLES[int(rng.integers(len(STYLES)))]
    drawn_shape = SHAPES[int(rng.integers(len(SHAPES)))]
    drawn_colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    drawn_kind = MASK_KINDS[int(rng.integers(len(MASK_KINDS)))]
    drawn_styled = bool(rng.integers(2))
    for name, value, allowed in (("style", style, STYLES), ("shape", shape, SHAPES),
                                 ("colour", colour, COLOUR_NAMES), ("mask_kind", mask_kind, MASK_KINDS)):
        if value is not None and value not in allowed:
            raise InputError(f"{name} '{value}' is not one of {', '.join(allowed)}")
    style = style or drawn_style
    jitter = rng.uniform(-0.04, 0.04, size=(2, 3))
    lo, hi = (np.clip(np.array(c) + j, 0, 1).round(4) for c, j in zip(STYLE_PALETTES[style], jitter))
    texture = _texture_params(style, rng)
    size = float(rng.uniform(18, 28))
    margin = int(rng.integers(2, 7))
    reach = size / 2 + margin + 2
    center = (float(rng.uniform(reach, IMAGE_SIZE - reach)), float(rng.uniform(reach, IMAGE_SIZE - reach)))
    return Scene(
        seed=int(seed), split=split, style=style, palette=(tuple(lo.tolist()), tuple(hi.tolist())),
        texture=texture, shape=shape or drawn_shape, colour=colour or drawn_colour, center=center, size=size,
        angle=float(rng.uniform(-12, 12)), mask_kind=mask_kind or drawn_kind, margin=margin,
        styled=drawn_styled if styled is None else bool(styled),
    )


# --- texture fields -------------------------------------------------------------------------

def _grid(n: int = IMAGE_SIZE, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each ``[n*s, n*s]``."""
    coords = (np.arange(n * supersample) + 0.5) / supersample
    return np.meshgrid(coords, coords)


def _smooth_step(x: np.ndarray, width: float) -> np.ndarray:
    return np.clip(0.5 + x / (2 * width), 0.0, 1.0)


def texture_field(style: str, params: dict) -> np.ndarray:
    """The style's texture value in [0, 1] at every pixel, ``[H, W]`` float32."""
    x, y = _grid()
    if style == "stripes":
        a = np.deg2rad(params["angle"])
        u = x * np.cos(a) + y * np.sin(a)
        s = np.sin(2 * np.pi * u / params["period"] + params["phase"])
        t = _smooth_step(s, 0.35)
    elif style == "checks":
        c = params["cell"]
        s = np.sin(np.pi * (x + params["ox"]) / c) * np.sin(np.pi * (y + params["oy"]) / c)
        t = _smooth_step(s, 0.25)
    elif style == "dots":
        d = params["spacing"]
        dx = np.mod(x + params["ox"], d) - d / 2
        dy = np.mod(y + params["oy"], d) - d / 2
        t = _smooth_step(params["radius"] - np.hypot(dx, dy), 0.7)
    elif style == "noise":
        grid = np.asarray(params["grid"], dtype=np.float64)
        gx, gy = x / params["cell"], y / params["cell"]
        x0, y0 = np.floor(gx).astype(int), np.floor(gy).astype(int)
        fx, fy = gx - x0, gy - y0
        fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
        v = (grid[y0, x0] * (1 - fx) * (1 - fy) + grid[y0, x0 + 1] * fx * (1 - fy)
             + grid[y0 + 1, x0] * (1 - fx) * fy + grid[y0 + 1, x0 + 1] * fx * fy)
        t = _smooth_step(v - 0.5, 0.12)
    elif style == "blobs":
        t = np.zeros_like(x)
        for cx, cy, a, half_len, half_width in params["strokes"]:
            # capsule around a segment of half length ``half_len``, drawn in its own window
            reach = half_len + half_width + 1
            x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, IMAGE_SIZE)
            y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, IMAGE_SIZE)
            if x0 >= x1 or y0 >= y1:
                continue
            ux, uy = np.cos(a), np.sin(a)
            px, py = x[y0:y1, x0:x1] - cx, y[y0:y1, x0:x1] - cy
            along = np.clip(px * ux + py * uy, -half_len, half_len)
            dist = np.hypot(px - along * ux, py - along * uy)
            t[y0:y1, x0:x1] = np.maximum(t[y0:y1, x0:x1], _smooth_step(half_width - dist, 0.7))
    elif style == "waves":
        a = np.deg2rad(params["angle"])
        u = x * np.cos(a) + y * np.sin(a)
        v = -x * np.sin(a) + y * np.cos(a)
        s = np.sin(2 * np.pi * (v + params["amplitude"] * np.sin(2 * np.pi * u / params["wavelength"])) / params["period"]
                   + params["phase"])
        t = _smooth_step(s, 0.35)
    else:
        raise InputError(f"style '{style}' is not one of {', '.join(STYLES)}")
    return t.astype(np.float32)


# --- shapes -------------------------------------------------------------------------------------

def _star_inside(r: np.ndarray, theta: np.ndarray, outer: float) -> np.ndarray:
    inner = 0.45 * outer
    sector = 2 * np.pi / 5
    local = np.mod(theta + np.pi / 2 + sector / 2, sector) - sector / 2  # 0 at a point (one points up)
    # boundary radius along the edge between a point (angle 0) and a notch (angle sector/2)
    p = np.array([outer, 0.0])
    q = np.array([inner * np.cos(sector / 2), inner * np.sin(sector / 2)])
    ang = np.abs(local)
    # intersection of the ray at ``ang`` with segment p-q
    dx, dy = q - p
    denom = np.cos(ang) * dy - np.sin(ang) * dx
    boundary = (p[0] * dy - p[1] * dx) / denom
    return r <= boundary


def object_coverage(scene: Scene, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the object, ``[H, W]`` float32 in [0, 1]."""
    cx, cy = scene.center
    # the object fits in a window of ``size`` * 1.2 around its centre; sample only there
    reach = int(np.ceil(scene.size * 0.62)) + 1
    x0, y0 = max(int(cx) - reach, 0), max(int(cy) - reach, 0)
    x1, y1 = min(int(cx) + reach + 1, IMAGE_SIZE), min(int(cy) + reach + 1, IMAGE_SIZE)
    ys = y0 + (np.arange((y1 - y0) * supersample) + 0.5) / supersample
    xs = x0 + (np.arange((x1 - x0) * supersample) + 0.5) / supersample
    x, y = np.meshgrid(xs, ys)
    a = np.deg2rad(scene.angle)
    # rotate into the object's frame (y grows downwards in image coordinates)
    px = (x - cx) * np.cos(a) + (y - cy) * np.sin(a)
    py = -(x - cx) * np.sin(a) + (y - cy) * np.cos(a)
    half = scene.size / 2
    if scene.shape == "circle":
        inside = px * px + py * py <= half * half
    elif scene.shape == "square":
        side = scene.size * 0.84  # same visual weight as the circle
        inside = (np.abs(px) <= side / 2) & (np.abs(py) <= side / 2)
    elif scene.shape == "triangle":
        # equilateral, pointing up, centred on its bounding box
        h = scene.size * 0.9
        top, bottom = -h / 2, h / 2
        half_base = h / np.sqrt(3)
        frac = (py - top) / h
        inside = (py >= top) & (py <= bottom) & (np.abs(px) <= frac * half_base)
    elif scene.shape == "star":
        r = np.hypot(px, py)
        theta = np.arctan2(py, px)
        inside = _star_inside(r, theta, half * 1.08)
    else:
        raise InputError(f"shape '{scene.shape}' is not one of {', '.join(SHAPES)}")
    window = inside.astype(np.float32).reshape(y1 - y0, supersample, x1 - x0, supersample).mean(axis=(1, 3))
    cov = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    cov[y0:y1, x0:x1] = window
    return cov


def _dilate(binary: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disc of ``radius`` pixels (numpy only)."""
    out = binary.copy()
    h, w = binary.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dx * dx + dy * dy > radius * radius:
                continue
            shifted = np.zeros_like(binary)
            ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
            xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
            shifted[ys, xs] = binary[yd, xd]
            out |= shifted
    return out


def dilate(binary: np.ndarray, radius: int) -> np.ndarray:
    """Public binary dilation (used by the judges for the ring around a mask)."""
    return _dilate(np.asarray(binary, dtype=bool), int(radius))


def scene_mask(scene: Scene, coverage: np.ndarray | None = None) -> np.ndarray:
    """The inpainting mask of the scene, ``[H, W]`` uint8 in {0, 255} (255 = inpaint).

    ``coverage``: :func:`object_coverage` of the scene if already computed.
    """
    solid = (object_coverage(scene) if coverage is None else coverage) > 0.5
    if scene.mask_kind == "box":
        ys, xs = np.nonzero(solid)
        m = np.zeros_like(solid)
        y0, y1 = max(ys.min() - scene.margin, 0), min(ys.max() + scene.margin + 1, IMAGE_SIZE)
        x0, x1 = max(xs.min() - scene.margin, 0), min(xs.max() + scene.margin + 1, IMAGE_SIZE)
        m[y0:y1, x0:x1] = True
    elif scene.mask_kind == "shape":
        m = _dilate(solid, scene.margin)
    else:
        raise InputError(f"mask kind '{scene.mask_kind}' is not one of {', '.join(MASK_KINDS)}")
    return (m * 255).astype(np.uint8)


# --- rendering ----------------------------------------------------------------------------------

def _luminance(rgb) -> float:
    r, g, b = rgb
    return 0.299 * r + 0.587 * g + 0.114 * b


def object_shades(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Colours of the styled object at texture 0 and 1: a dark and a light shade of the
    object colour, in the same light/dark order as the background palette."""
    colour = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    dark = colour * _DARK
    light = colour + (1 - colour) * _LIGHT
    lo, hi = scene.palette
    return (dark, light) if _luminance(lo) <= _luminance(hi) else (light, dark)


def render(scene: Scene, mode: Mode | None = None, coverage: np.ndarray | None = None) -> np.ndarray:
    """The scene's pixels, ``[H, W, 3]`` uint8.

    ``mode``: ``flat`` (plain object), ``styled`` (object in the background's texture),
    ``background`` (no object); default: the scene's own target (``styled`` or ``flat``).
    ``coverage``: :func:`object_coverage` of the scene if already computed.
    """
    mode = mode or ("styled" if scene.styled else "flat")
    if mode not in RENDER_MODES:
        raise InputError(f"render mode '{mode}' is not one of {', '.join(RENDER_MODES)}")
    t = texture_field(scene.style, scene.texture)[..., None]
    lo, hi = (np.asarray(c, dtype=np.float32) for c in scene.palette)
    image = lo + (hi - lo) * t
    if mode != "background":
        if mode == "flat":
            fill = np.broadcast_to(np.asarray(COLOURS[scene.colour], dtype=np.float32), image.shape)
        else:
            at0, at1 = object_shades(scene)
            fill = at0 + (at1 - at0) * t
        alpha = (object_coverage(scene) if coverage is None else coverage)[..., None]
        image = image * (1 - alpha) + fill * alpha
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


@dataclass
class Rendered:
    """A scene with its pixels: both object renderings, the mask and both captions."""

    scene: Scene
    flat: np.ndarray
    styled: np.ndarray
    mask: np.ndarray

    @property
    def target(self) -> np.ndarray:
        """The rendering the scene's caption describes."""
        return self.styled if self.scene.styled else self.flat


def render_scene(scene: Scene) -> Rendered:
    """Render both object versions and the mask, computing the object coverage once."""
    coverage = object_coverage(scene)
    return Rendered(scene, render(scene, "flat", coverage), render(scene, "styled", coverage), scene_mask(scene, coverage))


def masked_fraction(scene: Scene) -> float:
    """Share of the image the mask covers."""
    return float((scene_mask(scene) > 0).mean())
