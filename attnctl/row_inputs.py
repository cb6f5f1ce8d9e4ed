"""What added rows are made of besides their latent: their text embeddings, an image's VAE
latent, and UNet call arguments with those put in (``attnctl.rows``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from attnctl.errors import ConfigError
from attnctl.guidance import positional_names

if TYPE_CHECKING:
    from attnctl.rows import RowSpec

Text = tuple[torch.Tensor, "torch.Tensor | None"]  # embeddings [1, L, D], SDXL's pooled [1, P] (else None)


class RowTexts:
    """Text embeddings of a run's added rows, encoded once by the pipeline's ``encode_prompt``."""

    def __init__(self, pipe: Any):
        self.pipe = pipe
        self._by_role: dict[str, Text] = {}

    def of(self, spec: RowSpec, device) -> Text:
        """``spec``'s own text: its ``embeds`` (and ``pooled``), or its prompt encoded."""
        if spec.role not in self._by_role:
            if spec.embeds is not None:
                pooled = None if spec.pooled is None else torch.as_tensor(spec.pooled).to(device)
                self._by_role[spec.role] = (torch.as_tensor(spec.embeds).to(device), pooled)
            else:
                self._by_role[spec.role] = self._encode(spec.prompt, device, spec.role, negative=False)
        return self._by_role[spec.role]

    def empty_negative(self, device, role: str) -> Text:
        """The unconditional text the pipeline uses without a negative prompt (SD: the empty prompt's
        embedding; SDXL: zeros, ``force_zeros_for_empty_prompt``)."""
        return self._encode("", device, role, negative=True)

    def _encode(self, prompt: str, device, role: str, negative: bool) -> Text:
        encode = getattr(self.pipe, "encode_prompt", None)
        if encode is None:
            raise ConfigError(f"rows {role!r}: encoding text needs a pipeline; attach to the pipeline, or give "
                              "embeds= (and an inversion guidance of 1)")
        with torch.no_grad():
            out = encode(prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=negative)
        first = 1 if negative else 0  # (cond, uncond) or SDXL's (cond, uncond, pooled, uncond pooled)
        return out[first], out[first + 2] if len(out) == 4 else None


def with_text(unet: torch.nn.Module, args: tuple, kwargs: dict, timestep: Any, hidden: torch.Tensor,
              pooled: torch.Tensor | None) -> tuple[tuple, dict]:
    """UNet call arguments with the timestep, the text embeddings and (SDXL) the pooled ones replaced."""
    args, kwargs = list(args), dict(kwargs)
    names = positional_names(unet)
    for name, value in (("timestep", timestep), ("encoder_hidden_states", hidden)):
        i = names.index(name) if name in names else None
        if i is not None and i < len(args):
            args[i] = value
        else:
            kwargs[name] = value
    added = kwargs.get("added_cond_kwargs")
    if pooled is not None and added and "text_embeds" in added:
        kwargs["added_cond_kwargs"] = {**added, "text_embeds": pooled.to(added["text_embeds"].dtype)}
    return tuple(args), kwargs


def unet_sample(output: Any) -> torch.Tensor:
    """The noise prediction in a UNet's output (``return_dict=False`` tuple or ``UNet2DConditionOutput``)."""
    return output[0] if isinstance(output, tuple) else output.sample


def encode_image(pipe: Any, image: Any, latent_hw: tuple[int, int], role: str) -> torch.Tensor:
    """``image`` (a PIL image) as the VAE's latent ``[1, C, h, w]`` at ``latent_hw``: resized to the
    run's pixel size, the mean of the latent distribution times the scaling factor, in the VAE's dtype."""
    vae = getattr(pipe, "vae", None)
    processor = getattr(pipe, "image_processor", None)
    if vae is None or processor is None:
        raise ConfigError(f"rows {role!r}: an image reference needs a pipeline with a VAE; give clean=<latent> instead")
    if not hasattr(image, "convert"):
        raise ConfigError(f"rows {role!r}: image must be a PIL image (open files in the strategy), got {type(image).__name__}")
    factor = getattr(pipe, "vae_scale_factor", 8)
    pixels = processor.preprocess(image.convert("RGB"), height=latent_hw[0] * factor, width=latent_hw[1] * factor)
    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return dist.mode() * vae.config.scaling_factor
