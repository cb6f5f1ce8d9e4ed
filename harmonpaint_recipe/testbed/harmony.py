"""The harmony judge: does the masked region continue the background's pattern?

A small CNN reads the image and the mask, pools its texture features separately over the
masked region and over the background around it, and says how likely the region does
**not** carry the background's pattern. It is fitted on the world's ground truth only
(:mod:`.harmony_examples`): styled objects are the positives; flat objects, flat objects
with Gaussian noise inside the mask or everywhere, objects in another style's texture,
per-pixel noise textures, smooth shading and blurred-away patterns are the negatives. So
texture alone does not pass: only the background's own pattern does.

Given the input image (``source``), the judge looks at the region as it sits in the user's
picture: the output's masked pixels on the input's background. So an output cannot pass by
turning its whole picture, background included, into one texture: the region must continue
the background the user asked to keep.

``score`` normalizes that probability per mask kind with the means of styled and flat
ground truth of the ``calibrate`` split: ``(p - mean_p(styled)) / (mean_p(flat) -
mean_p(styled))``, so the styled truth scores about 0 and a flat paste about 1. Lower is
more harmonious.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnctl.errors import ConfigError, InputError
from harmonpaint_recipe.testbed.world import MASK_KINDS

#: pixels (a square's half side) between the mask and the background the judge compares it with
BACKGROUND_GAP = 2
#: fewest background pixels the judge needs to know the background's pattern
MIN_BACKGROUND = 64
#: the network pools its features on a grid this many times coarser than the image
STRIDE = 4


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU()]


class HarmonyNet(nn.Module):
    """Texture features of image + mask, pooled (mean, std) over the region and over the
    background, then compared by a small MLP; one logit per image (high = not harmonious)."""

    def __init__(self, widths: tuple[int, int, int] = (24, 48, 64)) -> None:
        super().__init__()
        a, b, c = widths
        self.features = nn.Sequential(
            *_conv(4, a), nn.AvgPool2d(2),
            *_conv(a, b), *_conv(b, b), nn.AvgPool2d(2),
            *_conv(b, c), *_conv(c, c),
        )
        self.head = nn.Sequential(nn.Linear(4 * c, 96), nn.ReLU(), nn.Linear(96, 1))

    @staticmethod
    def _stats(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        total = weight.sum(dim=(2, 3)).clamp_min(1e-6)
        mean = (features * weight).sum(dim=(2, 3)) / total
        var = ((features - mean[..., None, None]) ** 2 * weight).sum(dim=(2, 3)) / total
        return torch.cat([mean, var.clamp_min(0).add(1e-6).sqrt()], dim=1)

    def forward(self, images: torch.Tensor, region: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """``images`` ``[N, 3, H, W]`` in [-1, 1]; ``region``/``background`` ``[N, 1, H, W]`` in {0, 1}."""
        feats = self.features(torch.cat([images, region * 2 - 1], dim=1))
        inside = F.avg_pool2d(region, STRIDE)
        around = F.avg_pool2d(background, STRIDE)
        return self.head(torch.cat([self._stats(feats, inside), self._stats(feats, around)], dim=1))[:, 0]


def mask_kind_of(mask: np.ndarray) -> str:
    """``box`` when the mask fills its bounding box, else ``shape`` (a silhouette)."""
    ys, xs = np.nonzero(np.asarray(mask) > 0.5)
    if len(ys) == 0:
        raise InputError("the mask is empty: there is no region to judge; give a mask with white pixels")
    area = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return "box" if len(ys) == area else "shape"


def judge_inputs(images: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Network inputs for ``[N, H, W, 3]`` uint8 images and ``[N, H, W]`` masks (true = region)."""
    images, masks = np.asarray(images), np.asarray(masks) > 0.5
    if images.ndim != 4 or images.shape[-1] != 3 or masks.shape != images.shape[:3]:
        raise InputError(f"the harmony judge takes [N, H, W, 3] images with [N, H, W] masks, got {images.shape} "
                         f"and {masks.shape}")
    h, w = images.shape[1:3]
    if h % STRIDE or w % STRIDE:
        raise InputError(f"image sides must be multiples of {STRIDE} for the harmony judge, got {w}x{h}")
    region = torch.from_numpy(np.ascontiguousarray(masks)).float()[:, None]
    if (region.flatten(1).sum(1) == 0).any():
        raise InputError("the mask is empty: there is no region to judge; give a mask with white pixels")
    k = 2 * BACKGROUND_GAP + 1
    background = 1.0 - F.max_pool2d(region, k, stride=1, padding=BACKGROUND_GAP)
    if (background.flatten(1).sum(1) < MIN_BACKGROUND).any():
        raise InputError(f"the mask leaves fewer than {MIN_BACKGROUND} background pixels; the harmony judge "
                         "compares the region with the background around it, so it needs some")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, region, background


class HarmonyJudge:
    """How far a masked region is from continuing its background's pattern (module docstring).

    ``HarmonyJudge.load(path).score(image_uint8_HxWx3, mask_HxW)``: about 0 for the styled
    ground truth, about 1 for a flat paste; lower is more harmonious.
    """

    def __init__(self, net: HarmonyNet | None = None,
                 calibration: dict[str, tuple[float, float]] | None = None) -> None:
        self.net = (net or HarmonyNet()).eval()
        self.calibration = dict(calibration or {kind: (0.0, 1.0) for kind in MASK_KINDS})

    @classmethod
    def load(cls, path: str | Path) -> HarmonyJudge:
        """Load the network and calibration (safetensors) written by :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"harmony judge file '{path}' not found; make it with `attnctl testbed train`")
        tensors = load_file(str(path))
        if "calibration" not in tensors or not any(k.startswith("net.") for k in tensors):
            raise ConfigError(f"'{path}' is not a harmony judge of this version (no network weights); "
                              "train one with `attnctl testbed train`")
        net = HarmonyNet()
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        calib = tensors["calibration"].tolist()
        return cls(net, {kind: (row[0], row[1]) for kind, row in zip(MASK_KINDS, calib)})

    def save(self, path: str | Path) -> None:
        """Write the network and the calibration (rows: box, shape; columns: styled, flat mean) as safetensors."""
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        tensors["calibration"] = torch.tensor([list(self.calibration[k]) for k in MASK_KINDS], dtype=torch.float64)
        save_file(tensors, str(path))

    def calibrate(self, kind: str, styled: np.ndarray, flat: np.ndarray) -> None:
        """Set the normalization of masks of ``kind`` from raw probabilities on styled and flat ground truth."""
        s, f = float(np.mean(styled)), float(np.mean(flat))
        if not f > s:
            raise ConfigError(f"harmony calibration failed: flat scenes ({f:.4f}) do not score above styled ones ({s:.4f})")
        self.calibration[kind] = (s, f)

    @torch.no_grad()
    def probability(self, images: np.ndarray, masks: np.ndarray, batch: int = 256) -> np.ndarray:
        """Raw probability that each region does not continue its background, ``[N]``."""
        out = []
        for i in range(0, len(images), batch):
            x, region, background = judge_inputs(images[i:i + batch], masks[i:i + batch])
            out.append(torch.sigmoid(self.net(x, region, background)).double().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def score_many(self, images: np.ndarray, masks: np.ndarray, sources: np.ndarray | None = None) -> np.ndarray:
        """Calibrated harmony of ``[N, H, W, 3]`` uint8 images with ``[N, H, W]`` masks; with
        ``sources`` (the input images), each region is judged on its input's background."""
        images, masks = np.asarray(images), np.asarray(masks)
        if sources is not None:
            sources = np.asarray(sources)
            if sources.shape != images.shape:
                raise InputError(f"source images {sources.shape} do not match the images {images.shape}")
            images = np.where(masks[..., None] > 0.5, images, sources)
        p = self.probability(images, masks)
        bounds = np.array([self.calibration[mask_kind_of(m)] for m in np.asarray(masks)])
        return (p - bounds[:, 0]) / (bounds[:, 1] - bounds[:, 0])

    def score(self, image: np.ndarray, mask: np.ndarray, source: np.ndarray | None = None) -> float:
        """Calibrated harmony of one ``[H, W, 3]`` uint8 image: ~0 continues the background, ~1 a flat
        paste; with ``source`` (the input image), judged on the input's background."""
        sources = None if source is None else np.asarray(source)[None]
        return float(self.score_many(np.asarray(image)[None], np.asarray(mask)[None], sources)[0])
