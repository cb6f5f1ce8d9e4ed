"""The two fixed judges of the testbed, fitted on the world's ground truth only.

**Fidelity** (:class:`FidelityJudge`): a small CNN that looks at the mask's bounding box
(cropped, resized to 32x32) and names the object's shape (or ``none``) and colour. An
output is faithful when both match the prompt. It is trained on ground-truth renderings
(flat, styled and object-free), with blur, noise and colour jitter, never on model outputs.

**Harmony** (:class:`HarmonyJudge`): how far the texture statistics of the masked region
are from those of a ring of background around it: the share of untextured pixels (local
texture energy below a threshold set by the ring's own texture) in the region minus that
share in the ring. It is normalized on ground-truth renderings so that scenes whose object
is drawn in the background's style score 0 on average and flat pastes score 1:
``harmony = (d - mean_d(styled)) / (mean_d(flat) - mean_d(styled))``, with the means taken
separately for box and silhouette masks. Lower is more harmonious.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnctl.errors import ConfigError, InputError
from harmonpaint_recipe.testbed.world import COLOUR_NAMES, MASK_KINDS, SHAPES, dilate

#: shape classes of the fidelity judge: the world's shapes and "no object"
SHAPE_CLASSES: tuple[str, ...] = SHAPES + ("none",)
CROP = 32
CROP_PAD = 2
#: ring around the mask the harmony judge compares with: from GAP to GAP+RING pixels out
RING_GAP, RING = 2, 8


# --- fidelity ---------------------------------------------------------------------------------

def mask_box(mask: np.ndarray, pad: int = CROP_PAD) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the mask's bounding box grown by ``pad`` (clipped to the image)."""
    ys, xs = np.nonzero(np.asarray(mask) > 0.5)
    if len(ys) == 0:
        raise InputError("the mask is empty: there is no region to judge; give a mask with white pixels")
    h, w = mask.shape
    return max(ys.min() - pad, 0), min(ys.max() + pad + 1, h), max(xs.min() - pad, 0), min(xs.max() + pad + 1, w)


def crop_region(images: torch.Tensor, boxes: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """Crop each ``[3, H, W]`` image (in [-1, 1]) to its box and resize to ``CROP`` x ``CROP``."""
    out = []
    for img, (y0, y1, x0, x1) in zip(images, boxes):
        patch = img[:, y0:y1, x0:x1][None]
        out.append(F.interpolate(patch, size=(CROP, CROP), mode="bilinear", align_corners=False, antialias=True)[0])
    return torch.stack(out)


class FidelityNet(nn.Module):
    """CNN on a 32x32 crop: logits over :data:`SHAPE_CLASSES` and over the colours."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(3, 16), *block(16, 32), nn.MaxPool2d(2),
            *block(32, 64), nn.MaxPool2d(2),
            *block(64, 64), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(),
        )
        self.shape_head = nn.Linear(128, len(SHAPE_CLASSES))
        self.colour_head = nn.Linear(128, len(COLOUR_NAMES))

    def forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(crops)
        return self.shape_head(h), self.colour_head(h)


class FidelityJudge:
    """Names the shape and colour drawn in a masked region (see the module docstring)."""

    def __init__(self, net: FidelityNet) -> None:
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path) -> FidelityJudge:
        """Load the weights (safetensors) written by :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"fidelity judge weights '{path}' not found; train them with `attnctl testbed train`")
        net = FidelityNet()
        net.load_state_dict(load_file(str(path)))
        return cls(net)

    def save(self, path: str | Path) -> None:
        """Write the weights as safetensors."""
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path))

    @torch.no_grad()
    def predict(self, images: np.ndarray, masks: np.ndarray) -> list[tuple[str, str]]:
        """``[(shape, colour)]`` for ``[N, H, W, 3]`` uint8 images and ``[N, H, W]`` masks (1 = region)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        crops = crop_region(x, [mask_box(m) for m in masks])
        shape_logits, colour_logits = self.net(crops)
        return [(SHAPE_CLASSES[s], COLOUR_NAMES[c]) for s, c in zip(shape_logits.argmax(1).tolist(), colour_logits.argmax(1).tolist())]


# --- harmony ----------------------------------------------------------------------------------

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def texture_energy(image: np.ndarray, window: int = 5) -> np.ndarray:
    """Local texture energy of an ``[H, W, 3]`` uint8 image, ``[H, W]``: the mean absolute
    high-pass luminance (luminance minus its 3x3 mean) over a ``window`` x ``window`` box."""
    luma = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0 @ _LUMA)[None, None]
    high = luma - F.avg_pool2d(F.pad(luma, (1, 1, 1, 1), mode="reflect"), 3, 1)
    half = window // 2
    return F.avg_pool2d(F.pad(high.abs(), (half,) * 4, mode="reflect"), window, 1)[0, 0].numpy()


def mask_kind_of(mask: np.ndarray) -> str:
    """``box`` when the mask fills its bounding box, else ``shape`` (a silhouette)."""
    y0, y1, x0, x1 = mask_box(mask, pad=0)
    return "box" if int(np.count_nonzero(np.asarray(mask) > 0.5)) == (y1 - y0) * (x1 - x0) else "shape"


class HarmonyJudge:
    """Texture-statistics distance between the masked region and the ring around it.

    The raw distance is the share of *untextured* pixels in the region minus that share in
    the ring, where a pixel is untextured when its :func:`texture_energy` is below
    ``tau_factor`` times the ring's median energy (so the threshold follows each image's
    own texture strength, blur included). A flat object adds untextured pixels; an object
    drawn in the background's texture does not. ``score`` normalizes it with the means
    measured on styled and flat ground-truth scenes, separately for box masks and
    silhouette masks (a box holds background around the object, which dilutes the raw
    distance).
    """

    def __init__(self, calibration: dict[str, tuple[float, float]] | None = None, window: int = 5,
                 tau_factor: float = 0.25) -> None:
        self.calibration = dict(calibration or {kind: (0.0, 1.0) for kind in MASK_KINDS})
        self.window, self.tau_factor = int(window), float(tau_factor)

    @classmethod
    def load(cls, path: str | Path) -> HarmonyJudge:
        """Load the settings and calibration (safetensors) written by :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"harmony judge file '{path}' not found; make it with `attnctl testbed train`")
        t = load_file(str(path))
        calib = t["calibration"].tolist()
        window, tau = t["settings"].tolist()
        return cls({kind: (row[0], row[1]) for kind, row in zip(MASK_KINDS, calib)}, int(window), tau)

    def save(self, path: str | Path) -> None:
        """Write the settings and calibration (rows: box, shape; columns: styled, flat) as safetensors."""
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({
            "calibration": torch.tensor([list(self.calibration[k]) for k in MASK_KINDS], dtype=torch.float64),
            "settings": torch.tensor([self.window, self.tau_factor], dtype=torch.float64),
        }, str(path))

    def calibrate(self, kind: str, styled_distances: np.ndarray, flat_distances: np.ndarray) -> None:
        """Set the normalization of masks of ``kind`` from raw distances of styled and flat
        ground-truth scenes."""
        s, f = float(np.mean(styled_distances)), float(np.mean(flat_distances))
        if not f > s:
            raise ConfigError(f"harmony calibration failed: flat scenes ({f:.4f}) do not score above styled ones ({s:.4f})")
        self.calibration[kind] = (s, f)

    def distance(self, image: np.ndarray, mask: np.ndarray) -> float:
        """Raw (uncalibrated) distance between the masked region and the ring around it."""
        region = np.asarray(mask) > 0.5
        if not region.any():
            raise InputError("the mask is empty: there is no region to judge; give a mask with white pixels")
        ring = dilate(region, RING_GAP + RING) & ~dilate(region, RING_GAP)
        if ring.sum() < 16:
            raise InputError("the mask leaves almost no background around it; the harmony judge needs a ring of "
                             f"{RING} pixels outside the mask")
        energy = texture_energy(image, self.window)
        inside, around = energy[region], energy[ring]
        tau = self.tau_factor * float(np.median(around)) + 1e-4
        return float((inside < tau).mean() - (around < tau).mean())

    def score(self, image: np.ndarray, mask: np.ndarray) -> float:
        """Calibrated harmony: ~0 for the background's style, ~1 for a flat paste (lower is better)."""
        styled, flat = self.calibration[mask_kind_of(np.asarray(mask) > 0.5)]
        return (self.distance(image, mask) - styled) / (flat - styled)
