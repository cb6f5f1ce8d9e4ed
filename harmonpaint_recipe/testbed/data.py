"""Batches of world scenes as tensors, for training the VAE, the UNet and the judges.

Scene ``i`` of a split is ``sample_scene(i, split)``, so a batch is fully determined by
its scene numbers. A background thread renders the next batch while the model trains on
the current one (rendering is numpy; it costs a few milliseconds a scene).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from harmonpaint_recipe.testbed.world import RENDER_MODES, dilate, object_coverage, render, render_scene, sample_scene


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """``[N, H, W, 3]`` uint8 -> ``[N, 3, H, W]`` float in [-1, 1] (the pipeline's range)."""
    return torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_tensor` (clamped)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def vae_batch(start: int, size: int, split: str = "train") -> torch.Tensor:
    """Images of scenes ``start .. start+size-1`` for the VAE: each rendered flat, styled or
    without object (chosen by the scene number), ``[N, 3, 64, 64]`` in [-1, 1]."""
    return vae_examples(start, size, split)[0]


def vae_examples(start: int, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, list[tuple[float, float]]]:
    """As :func:`vae_batch`, plus where the object is: ``[N, 1, H, W]`` object maps (the
    coverage dilated by 2 pixels; zero without object) and the object centres ``(x, y)``."""
    images, maps, centers = [], [], []
    for i in range(start, start + size):
        scene = sample_scene(i, split)
        mode = RENDER_MODES[i % 3]
        coverage = object_coverage(scene)
        images.append(render(scene, mode, coverage))
        maps.append(dilate(coverage > 0, 2) if mode != "background" else np.zeros_like(coverage, dtype=bool))
        centers.append(scene.center)
    return to_tensor(np.stack(images)), torch.from_numpy(np.stack(maps)).float()[:, None], centers


@dataclass
class InpaintBatch:
    """Scenes rendered for inpainting: both object renderings, masks, masked images, captions."""

    flat: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    styled: torch.Tensor  # [N, 3, H, W]
    mask: torch.Tensor  # [N, 1, H, W] in {0, 1}, 1 = inpaint
    masked: torch.Tensor  # [N, 3, H, W]: the image with the mask's pixels at 0, as the pipeline makes it
    flat_captions: list[str]
    styled_captions: list[str]


def inpaint_batch(start: int, size: int, split: str = "train") -> InpaintBatch:
    """Scenes ``start .. start+size-1`` for the UNet. The masked image is the same for both
    renderings (the object is inside the mask), so one encoding of it serves both."""
    rendered = [render_scene(sample_scene(i, split)) for i in range(start, start + size)]
    flat = to_tensor(np.stack([r.flat for r in rendered]))
    styled = to_tensor(np.stack([r.styled for r in rendered]))
    mask = torch.from_numpy(np.stack([r.mask for r in rendered]) >= 128).float()[:, None]
    return InpaintBatch(
        flat=flat, styled=styled, mask=mask, masked=flat * (mask < 0.5),
        flat_captions=[r.scene.caption(False) for r in rendered],
        styled_captions=[r.scene.caption(True) for r in rendered],
    )


def prefetch(make: Callable[[int], object], starts: Iterator[int], depth: int = 2) -> Iterator[object]:
    """Yield ``make(start)`` for each start, computed one or two batches ahead in a thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for s in starts:
                if stop.is_set():
                    return
                q.put(make(s))
        finally:
            q.put(None)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            yield item
    finally:
        stop.set()
