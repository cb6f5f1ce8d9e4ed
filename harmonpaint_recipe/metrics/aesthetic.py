"""Aesthetic Score: the LAION "improved aesthetic predictor" head on CLIP ViT-L/14 embeddings.

The public predictor (christophschuhmann/improved-aesthetic-predictor, ``sac+logos+ava1-l14-
linearMSE.pth``) is an ``nn.Sequential`` named ``layers``:

    0 Linear(768, 1024), 1 Dropout(0.2), 2 Linear(1024, 128), 3 Dropout(0.2),
    4 Linear(128, 64),   5 Dropout(0.1), 6 Linear(64, 16),    7 Linear(16, 1)

with no activations (its ReLUs are commented out), applied to the L2-normalized image
embedding of ``openai/clip-vit-large-patch14``. :class:`AestheticHead` keeps the same
module indices so the original state dict loads unchanged.

Weights are read from a **safetensors** file given by the user. We never unpickle; to
convert the original ``.pth`` once, in an environment you trust::

    import torch, safetensors.torch as st
    sd = torch.load("sac+logos+ava1-l14-linearMSE.pth", map_location="cpu", weights_only=True)
    st.save_file({k: v.contiguous() for k, v in sd.items()}, "aesthetic_head.safetensors")
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from harmonpaint_recipe.metrics.base import Metric, MetricResult, MetricUnavailable, Sample
from harmonpaint_recipe.metrics.clip_embedder import ClipEmbedder, l2_normalize


class AestheticHead(nn.Module):
    """The MLP 768-1024-128-64-16-1 of the improved aesthetic predictor (eval mode: dropout off)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """Score of each row of an L2-normalized ``[N, input_size]`` embedding."""
        return self.layers(embedding).squeeze(-1)


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    """Load head weights from a ``.safetensors`` file; raise :class:`MetricUnavailable` if impossible."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MetricUnavailable(
            f"aesthetic head '{path}' is not a .safetensors file; convert the original .pth once "
            "(see docs/evaluation.md) and pass --aesthetic-head head.safetensors"
        )
    if not path.is_file():
        raise MetricUnavailable(f"aesthetic head '{path}' does not exist; pass --aesthetic-head PATH")
    from safetensors.torch import load_file

    state = load_file(str(path))
    head = AestheticHead(input_size=state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
    return head.eval()


class AestheticScore(Metric):
    """LAION aesthetic score (roughly 1-10) of the generated image."""

    name: ClassVar[str] = "as"
    keys: ClassVar[tuple[str, ...]] = ("as",)

    def __init__(self, embedder: ClipEmbedder, head: AestheticHead | None = None, head_path: str | None = None) -> None:
        self.embedder = embedder
        self.head = head
        self.head_path = head_path

    def load(self) -> None:
        if self.head is None:
            if not self.head_path:
                raise MetricUnavailable(
                    "no aesthetic predictor head given; pass --aesthetic-head head.safetensors "
                    "(LAION improved aesthetic predictor, see docs/evaluation.md)"
                )
            self.head = load_aesthetic_head(self.head_path)
        self.embedder.load()

    @torch.no_grad()
    def score(self, sample: Sample) -> MetricResult:
        emb = l2_normalize(self.embedder.image_embeds([sample.image]))
        return MetricResult({"as": float(self.head(emb)[0])})
