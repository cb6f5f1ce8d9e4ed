"""CMMD (Jayasumana et al., CVPR 2024, "Rethinking FID"): MMD^2 between CLIP embeddings.

Definition as in google-research/cmmd: Gaussian RBF kernel ``k(x, y) = exp(-||x - y||^2 /
(2 sigma^2))`` with ``sigma = 10``, the biased (V-statistic) estimator

    MMD^2 = mean k(X, X) + mean k(Y, Y) - 2 mean k(X, Y)

(diagonals included), multiplied by ``scale = 1000``, on L2-normalized CLIP ViT-L/14@336
(``openai/clip-vit-large-patch14-336``) image embeddings. The two sets may differ in size.
Lower is better; identical sets give 0.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import numpy as np
import torch
from PIL import Image

from harmonpaint_recipe.metrics.base import Metric
from harmonpaint_recipe.metrics.clip_embedder import ClipEmbedder, l2_normalize

SIGMA = 10.0
SCALE = 1000.0


def mmd_rbf(x: np.ndarray, y: np.ndarray, sigma: float = SIGMA, scale: float = SCALE) -> float:
    """Biased MMD^2 estimate with a Gaussian RBF kernel, times ``scale`` (float64)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"expected two non-empty [N, D] sets with the same D, got {x.shape} and {y.shape}")
    gamma = 1.0 / (2.0 * sigma**2)

    def mean_kernel(a: np.ndarray, b: np.ndarray) -> float:
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return float(np.exp(-gamma * np.maximum(sq, 0.0)).mean())

    return scale * (mean_kernel(x, x) + mean_kernel(y, y) - 2.0 * mean_kernel(x, y))


class Cmmd(Metric):
    """Set-level metric: embed each image once (:meth:`embed`), then :meth:`compute`."""

    name: ClassVar[str] = "cmmd"
    keys: ClassVar[tuple[str, ...]] = ("cmmd",)
    per_item: ClassVar[bool] = False

    def __init__(self, embedder: ClipEmbedder, batch_size: int = 16) -> None:
        self.embedder = embedder
        self.batch_size = batch_size

    def load(self) -> None:
        self.embedder.load()

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalized image embeddings, ``[N, D]`` float64."""
        chunks = [
            l2_normalize(self.embedder.image_embeds(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        return torch.cat(chunks).double().numpy()

    @staticmethod
    def compute(generated: np.ndarray, reference: np.ndarray) -> float:
        """CMMD between two embedding sets (see module docstring)."""
        return mmd_rbf(reference, generated)
