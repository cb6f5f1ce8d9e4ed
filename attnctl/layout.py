"""The batch layout of a pipeline's UNet calls: what each row is (branch, image, prompt).

Explicit, never guessed from ``batch // 2``: ``BatchLayout.for_call(pipe, prompt=..., ...)``
follows the pipeline's own rules (classifier-free guidance, PAG's perturbed rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

from attnctl.errors import ConfigError

if TYPE_CHECKING:
    import torch

Branch = Literal["uncond", "cond", "perturbed"]
BRANCHES: tuple[str, ...] = ("uncond", "cond", "perturbed")


@dataclass(frozen=True)
class BatchLayout:
    """What each batch row of a UNet call is.

    Attributes:
        branches: per row, ``"uncond"`` (classifier-free guidance's unconditional half),
            ``"cond"`` (conditioned on the prompt) or ``"perturbed"`` (a conditional copy
            that a guidance method such as PAG runs with perturbed attention).
        images: per row, the index of the output image it belongs to.
        prompts: per row, the index of the prompt it was conditioned on.
    """

    branches: tuple[Branch, ...]
    images: tuple[int, ...]
    prompts: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.branches) == len(self.images) == len(self.prompts) or not self.branches:
            raise ConfigError(
                f"BatchLayout needs one branch, image and prompt per row; got {len(self.branches)} branches, "
                f"{len(self.images)} images, {len(self.prompts)} prompts"
            )
        unknown = sorted(set(self.branches) - set(BRANCHES))
        if unknown:
            raise ConfigError(f"BatchLayout branches must be among {', '.join(BRANCHES)}; got {', '.join(unknown)}")

    @classmethod
    def for_pipeline(
        cls, num_prompts: int, num_images_per_prompt: int = 1, cfg: bool = True, perturbed: bool = False
    ) -> BatchLayout:
        """The layout diffusers' SD/SDXL pipelines use.

        Images are ``prompt-major`` (prompt 0 image 0, prompt 0 image 1, ...). With CFG the
        unconditional copy of every image comes first, then the conditional one; with
        perturbed-attention guidance (``perturbed=True``, diffusers' PAG pipelines) a third,
        perturbed conditional copy follows.
        """
        n = num_prompts * num_images_per_prompt
        images = tuple(range(n))
        prompts = tuple(i // num_images_per_prompt for i in images)
        blocks: list[Branch] = (["uncond"] if cfg else []) + ["cond"] + (["perturbed"] if perturbed else [])
        return cls(
            tuple(b for b in blocks for _ in range(n)), images * len(blocks), prompts * len(blocks)
        )

    @classmethod
    def for_call(cls, pipe: Any, prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 guidance_scale: float | None = None, pag_scale: float | None = None,
                 prompt_embeds: torch.Tensor | None = None) -> BatchLayout:
        """The layout ``pipe(prompt=..., num_images_per_prompt=..., guidance_scale=..., ...)`` will run.

        Follows diffusers' own rules: classifier-free guidance iff ``guidance_scale > 1`` and
        the UNet has no guidance embedding (``time_cond_proj_dim``); perturbed-attention
        rows iff ``pipe`` is a PAG pipeline and ``pag_scale > 0``. Omitted arguments take the
        pipeline's defaults (``guidance_scale`` 7.5, ``pag_scale`` 3.0).
        """
        if prompt is not None:
            num_prompts = 1 if isinstance(prompt, str) else len(prompt)
        elif prompt_embeds is not None:
            num_prompts = prompt_embeds.shape[0]
        else:
            raise ConfigError("BatchLayout.for_call needs the prompt (or prompt_embeds) the pipeline is called with")
        scale = 7.5 if guidance_scale is None else float(guidance_scale)
        unet_config = getattr(getattr(pipe, "unet", None), "config", None)
        cfg = scale > 1.0 and getattr(unet_config, "time_cond_proj_dim", None) is None
        is_pag = hasattr(pipe, "set_pag_applied_layers")
        perturbed = is_pag and (3.0 if pag_scale is None else float(pag_scale)) > 0.0
        return cls.for_pipeline(num_prompts, num_images_per_prompt, cfg=cfg, perturbed=perturbed)

    def __len__(self) -> int:
        return len(self.branches)

    @property
    def num_images(self) -> int:
        return max(self.images) + 1

    @property
    def cond_rows(self) -> tuple[int, ...]:
        """Rows of the conditional branch, in image order."""
        return tuple(sorted((r for r, b in enumerate(self.branches) if b == "cond"), key=lambda r: self.images[r]))

    def describe(self) -> str:
        """E.g. ``2 rows (uncond x1, cond x1)``, for error messages."""
        counts = {b: self.branches.count(b) for b in BRANCHES if b in self.branches}
        return f"{len(self)} rows ({', '.join(f'{b} x{n}' for b, n in counts.items())})"

    def subset(self, rows: Sequence[int]) -> BatchLayout:
        """Layout of a batch made of ``rows`` of this one."""
        return BatchLayout(
            tuple(self.branches[r] for r in rows), tuple(self.images[r] for r in rows), tuple(self.prompts[r] for r in rows)
        )
