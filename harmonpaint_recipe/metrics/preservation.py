"""Preservation of the unmasked region: MSE, PSNR and (when available) LPIPS.

Two modes, both comparing the generated image with the source over the pixels where the
inpainting mask is 0:

``standard`` (default)
    Images as RGB floats in [0, 1]; the generated image is resized (bicubic) to the source size
    if they differ. ``MSE = mean over unmasked pixels and the 3 channels of (gen - src)^2``,
    ``PSNR = 10 log10(1 / MSE)`` dB, capped at 100 dB when MSE is 0.

``brushbench``
    What BrushBench (BrushNet, ECCV 2024, ``evaluate_brushnet.py --blended``) reports as
    "masked region preservation": both images resized to 512x512 (bicubic); the generated
    image pasted onto the source through the mask blurred by a 21x21 Gaussian (sigma 3.5,
    reflect-101 border, blur rounded to uint8 as OpenCV does) and quantized to uint8;
    then ``MSE = sum over unmasked pixels and 3 channels of diff^2 / number of unmasked
    pixels`` (note: divided by the pixel count, not pixels x channels, so 3x the
    per-channel mean), ``PSNR = 20 log10(1 / sqrt(MSE))``, 1000 when MSE < 1e-10.

LPIPS (both modes) is computed on the two images with the masked region set to 0, inputs
scaled to [-1, 1], using an injected callable or torchmetrics' SqueezeNet LPIPS. The latter
needs torchvision and downloaded backbone weights, so offline it reports itself unavailable.
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar

import numpy as np
import torch
from PIL import Image

from harmonpaint_recipe.metrics.base import Metric, MetricResult, MetricUnavailable, Sample

PSNR_CAP_DB = 100.0
BRUSHBENCH_SIZE = 512
LpipsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def to_float(image: Image.Image, size: tuple[int, int] | None = None) -> np.ndarray:
    """RGB float64 array in [0, 1], optionally resized (bicubic) to ``size = (W, H)``."""
    image = image.convert("RGB")
    if size is not None and image.size != tuple(size):
        image = image.resize(size, Image.BICUBIC)
    return np.asarray(image, dtype=np.float64) / 255.0


def masked_mse(generated: np.ndarray, source: np.ndarray, keep: np.ndarray) -> float:
    """Mean of the squared difference over the pixels where ``keep`` is true, all channels."""
    return float(((generated - source) ** 2)[keep].mean())


def psnr_from_mse(mse: float, cap: float = PSNR_CAP_DB) -> float:
    """``10 log10(1 / mse)`` for images in [0, 1], capped at ``cap`` dB."""
    return cap if mse <= 10 ** (-cap / 10) else 10.0 * math.log10(1.0 / mse)


def gaussian_blur_reflect101(x: np.ndarray, ksize: int = 21, sigma: float = 3.5) -> np.ndarray:
    """Separable Gaussian blur of a 2-D array with a reflect-101 border (OpenCV's default)."""
    r = ksize // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(t**2) / (2 * sigma**2))
    k /= k.sum()
    padded = np.pad(x.astype(np.float64), r, mode="reflect")  # numpy 'reflect' == reflect-101
    h, w = x.shape
    rows = sum(k[i] * padded[:, i : i + w] for i in range(ksize))
    return sum(k[i] * rows[i : i + h, :] for i in range(ksize))


def brushbench_blend(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """BrushBench's ``--blended`` paste of the generation onto the source (uint8-quantized)."""
    soft = np.round(gaussian_blur_reflect101(mask * 255.0)) / 255.0
    soft = soft[..., None]
    pasted = np.floor(source * 255.0 * (1 - soft) + generated * 255.0 * soft + 1e-9)
    return np.clip(pasted, 0, 255) / 255.0


class Preservation(Metric):
    """MSE / PSNR (and, on request, LPIPS) between generated and source images outside the mask.

    LPIPS is opt-in (``with_lpips``, ``--lpips``): torchmetrics' network needs torchvision and
    downloaded weights, which a CPU-only or offline install lacks, so by default the table
    has no column that could only say "n/a".
    """

    name: ClassVar[str] = "preserve"
    keys: tuple[str, ...] = ("mse", "psnr")

    def __init__(self, mode: str = "standard", lpips: LpipsFn | None = None, local_files_only: bool = False,
                 with_lpips: bool | None = None) -> None:
        if mode not in ("standard", "brushbench"):
            raise ValueError(f"unknown preservation mode '{mode}'; use 'standard' or 'brushbench'")
        self.mode = mode
        self.with_lpips = lpips is not None if with_lpips is None else with_lpips
        self.keys = ("mse", "psnr", "lpips") if self.with_lpips else ("mse", "psnr")
        self.lpips = lpips
        self.local_files_only = local_files_only
        self._lpips_error: str | None = None

    def _lpips_fn(self) -> LpipsFn:
        if self.lpips is not None:
            return self.lpips
        if self._lpips_error is None:
            if self.local_files_only:
                self._lpips_error = "LPIPS needs downloaded network weights and --local-files-only is set"
            else:
                try:
                    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                    self.lpips = LearnedPerceptualImagePatchSimilarity(net_type="squeeze").eval()
                    return self.lpips
                except Exception as exc:  # missing torchvision, no network for the weights, ...
                    self._lpips_error = f"LPIPS unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise MetricUnavailable(self._lpips_error)

    def score(self, sample: Sample) -> MetricResult:
        if sample.source is None or sample.mask is None:
            raise MetricUnavailable("preservation needs the item's source image and mask")
        mask = (np.asarray(sample.mask, dtype=np.float64) >= 0.5).astype(np.float64)
        if self.mode == "standard":
            src = to_float(sample.source)
            gen = to_float(sample.image, size=sample.source.size)
        else:
            size = (BRUSHBENCH_SIZE, BRUSHBENCH_SIZE)
            src = to_float(sample.source, size)
            gen = to_float(sample.image, size)
            mask_img = Image.fromarray((mask * 255).astype(np.uint8)).resize(size, Image.NEAREST)
            mask = (np.asarray(mask_img) >= 128).astype(np.float64)
            gen = brushbench_blend(gen, src, mask)
        keep = mask == 0
        if not keep.any():
            raise MetricUnavailable("the mask covers the whole image; there is no unmasked region")
        mse = masked_mse(gen, src, keep)
        if self.mode == "standard":
            values = {"mse": mse, "psnr": psnr_from_mse(mse)}
        else:
            mse = 3.0 * mse  # BrushBench divides the 3-channel sum by the pixel count
            values = {"mse": mse, "psnr": 1000.0 if mse < 1e-10 else 20.0 * math.log10(1.0 / math.sqrt(mse))}
        result = MetricResult(values)
        if not self.with_lpips:
            return result
        try:
            fn = self._lpips_fn()
            keep3 = torch.from_numpy(keep[None, None].astype(np.float32))
            a = torch.from_numpy(gen.astype(np.float32)).permute(2, 0, 1)[None] * keep3
            b = torch.from_numpy(src.astype(np.float32)).permute(2, 0, 1)[None] * keep3
            with torch.no_grad():
                result.values["lpips"] = float(fn(a * 2 - 1, b * 2 - 1))
        except MetricUnavailable as exc:
            result.values["lpips"] = None
            result.unavailable["lpips"] = str(exc)
        return result
