"""A CLIP model + processor pair that turns images and texts into embeddings.

Shared by CS, AS and CMMD. The model is loaded lazily with ``from_pretrained`` (honouring
``local_files_only``), or injected ready-made (tests, notebooks).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from harmonpaint_recipe.metrics.base import MetricUnavailable


def _as_tensor(features: Any) -> torch.Tensor:
    # transformers >= 5 returns a ModelOutput whose pooler_output holds the projected embedding
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output


class ClipEmbedder:
    """Image/text embeddings from a CLIP checkpoint (hub id or local folder)."""

    def __init__(
        self,
        model_name_or_path: str,
        *,
        local_files_only: bool = False,
        device: str | torch.device = "cpu",
        model: Any = None,
        processor: Any = None,
        options: tuple[str, ...] = ("--clip-model",),
    ) -> None:
        self.model_name_or_path = model_name_or_path
        #: the command-line options that choose this checkpoint (named in the unavailable reason)
        self.options = list(options)
        self.local_files_only = local_files_only
        self.device = torch.device(device)
        self.model = model
        self.processor = processor
        self._error: str | None = None

    def load(self) -> None:
        """Load model and processor once; raise :class:`MetricUnavailable` if that fails."""
        if self.model is not None and self.processor is not None:
            return
        if self._error is not None:
            raise MetricUnavailable(self._error)
        try:
            from transformers import CLIPModel, CLIPProcessor

            self.model = CLIPModel.from_pretrained(
                self.model_name_or_path, local_files_only=self.local_files_only
            )
            self.processor = CLIPProcessor.from_pretrained(
                self.model_name_or_path, local_files_only=self.local_files_only
            )
        except (OSError, ValueError) as exc:
            self.model = self.processor = None
            self._error = (
                f"could not load CLIP model '{self.model_name_or_path}' "
                f"({type(exc).__name__}: {str(exc).splitlines()[0]}); download it once or pass "
                f"a local folder with {' / '.join(self.options)} (e.g. {self.options[0]} /models/clip-vit-large-patch14)"
            )
            raise MetricUnavailable(self._error) from exc
        self.model.to(self.device).eval()

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Un-normalized image embeddings, ``[N, D]`` float32 on CPU."""
        self.load()
        batch = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        out = self.model.get_image_features(pixel_values=batch["pixel_values"].to(self.device))
        return _as_tensor(out).float().cpu()

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """Un-normalized text embeddings, ``[N, D]`` float32 on CPU (captions truncated to the
        model's context length)."""
        self.load()
        max_len = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        batch = self.processor(
            text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_len
        )
        out = self.model.get_text_features(
            input_ids=batch["input_ids"].to(self.device),
            attention_mask=batch["attention_mask"].to(self.device),
        )
        return _as_tensor(out).float().cpu()


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm."""
    return x / x.norm(p=2, dim=-1, keepdim=True)
