"""The two fixed judges of the testbed, fitted on the world's ground truth only.

**Fidelity** (:class:`FidelityJudge`): a small CNN that looks at the mask's bounding box
(cropped, resized to 32x32) and names the object's shape (or ``none``) and colour. An
output is faithful when both match the prompt. It is trained on ground-truth renderings
(flat, styled and object-free), with blur, noise and colour jitter, never on model outputs.

**Harmony** (:class:`HarmonyJudge`, in :mod:`.harmony`): whether the masked region continues
the background's pattern; about 0 for the styled truth, about 1 for a flat paste.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attnctl.errors import ConfigError, InputError
from harmonpaint_recipe.testbed.harmony import HarmonyJudge
from harmonpaint_recipe.testbed.world import COLOUR_NAMES, SHAPES

#: shape classes of the fidelity judge: the world's shapes and "no object"
SHAPE_CLASSES: tuple[str, ...] = SHAPES + ("none",)
CROP = 32
CROP_PAD = 2

__all__ = ["SHAPE_CLASSES", "FidelityJudge", "FidelityNet", "HarmonyJudge", "crop_region", "mask_box"]


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
