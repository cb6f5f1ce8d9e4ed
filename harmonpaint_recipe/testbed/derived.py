"""Outputs derived from generated ones, for the testbed table: paste-back and a noise control.

- **paste-back** (``<method>+paste``): the method's output composited onto the input outside
  the mask, exactly what ``output.paste_back=true`` makes the runner do after the same
  generation (so it is computed from the stored output instead of generating again);
- **matched noise** (``none+noise``): stock SDI's output with Gaussian noise added inside the
  mask, per scene as strong as the detail energy (structure finer than a Gaussian of
  ``DETAIL_SIGMA`` pixels) HarmonPaint adds there over SDI. If the harmony judge rewarded
  HarmonPaint for the texture its steps add, it would reward this row as much.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from harmonpaint_recipe.files import atomic_save_image
from harmonpaint_recipe.paste_back import paste_back

#: detail = the image minus its Gaussian blur of this sigma (pixels): structure up to ~2 sigma across
DETAIL_SIGMA = 3.0


def _kernel(sigma: float) -> np.ndarray:
    t = np.arange(-int(np.ceil(3 * sigma)), int(np.ceil(3 * sigma)) + 1, dtype=np.float64)
    k = np.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def _detail_gain(sigma: float) -> float:
    """Share of white noise's variance that ``x - blur(x)`` keeps (the blur is separable)."""
    k = _kernel(sigma)
    k2 = np.outer(k, k)
    delta = np.zeros_like(k2)
    delta[len(k) // 2, len(k) // 2] = 1.0
    return float(((delta - k2) ** 2).sum())


def detail_variance(image: np.ndarray, mask: np.ndarray, sigma: float = DETAIL_SIGMA) -> float:
    """Variance of ``x - blur_sigma(x)`` over the mask's pixels and the 3 channels (0-255 levels)."""
    x = np.asarray(image, dtype=np.float64)
    k = _kernel(sigma)
    r = len(k) // 2
    h, w = x.shape[:2]
    padded = np.pad(x, ((r, r), (r, r), (0, 0)), mode="reflect")
    rows = sum(k[i] * padded[:, i:i + w] for i in range(len(k)))
    blurred = sum(k[i] * rows[i:i + h] for i in range(len(k)))
    return float(((x - blurred)[np.asarray(mask) > 0.5] ** 2).mean())


def matched_sigma(reference: np.ndarray, treated: np.ndarray, mask: np.ndarray) -> float:
    """The Gaussian noise sigma whose detail energy equals what ``treated`` adds over ``reference`` in the mask."""
    extra = detail_variance(treated, mask) - detail_variance(reference, mask)
    return float(np.sqrt(max(extra, 0.0) / _detail_gain(DETAIL_SIGMA)))


def _item_rng(item_id: str, seed: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def write_paste_back(outputs: Path, base: str, target: Path, records: list[dict], data: Path, blur: float) -> None:
    """``target/<id>.png`` = ``base``'s output pasted onto the item's input outside the mask."""
    for rec in records:
        out = target / f"{rec['id']}.png"
        if out.is_file():
            continue
        mask = np.asarray(Image.open(data / rec["mask"]).convert("L"), dtype=np.float64) / 255.0
        generated = Image.open(outputs / base / f"{rec['id']}.png").convert("RGB")
        source = Image.open(data / rec["image"]).convert("RGB")
        atomic_save_image(out, paste_back(generated, source, mask, blur))


def write_matched_noise(outputs: Path, reference: str, treated: str, target: Path, records: list[dict], data: Path,
                        seed: int = 0) -> list[float]:
    """``target/<id>.png`` = ``reference``'s output + noise in the mask matched to ``treated``; returns the sigmas."""
    sigmas = []
    for rec in records:
        mask = np.asarray(Image.open(data / rec["mask"]).convert("L")) > 127
        base = _load(outputs / reference / f"{rec['id']}.png")
        sigma = matched_sigma(base, _load(outputs / treated / f"{rec['id']}.png"), mask)
        sigmas.append(sigma)
        out = target / f"{rec['id']}.png"
        if out.is_file():
            continue
        noise = _item_rng(rec["id"], seed).normal(0.0, sigma, size=base.shape) * mask[..., None]
        atomic_save_image(out, Image.fromarray(np.clip(np.round(base + noise), 0, 255).astype(np.uint8)))
    return sigmas
