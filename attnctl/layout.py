"""The batch layout of a pipeline's UNet calls: what each row is (branch, image, prompt, role).

Explicit, never guessed from ``batch // 2``: ``BatchLayout.for_call(pipe, prompt=..., ...)``
follows the pipeline's own rules (classifier-free guidance, PAG's perturbed rows). Rows
the pipeline makes have the role ``"main"``; rows a strategy adds (a source or reference
image denoised beside the main ones, see ``attnctl.rows``) have the role it names, and
come after the main rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Sequence

from attnctl.errors import ConfigError

if TYPE_CHECKING:
    import torch

Branch = Literal["uncond", "cond", "perturbed"]
BRANCHES: tuple[str, ...] = ("uncond", "cond", "perturbed")
#: the role of the rows the pipeline itself makes
MAIN_ROLE = "main"


@dataclass(frozen=True)
class BatchLayout:
    """What each batch row of a UNet call is.

    Attributes:
        branches: per row, ``"uncond"`` (classifier-free guidance's unconditional half),
            ``"cond"`` (conditioned on the prompt) or ``"perturbed"`` (a conditional copy
            that a guidance method such as PAG runs with perturbed attention).
        images: per row, the index of the output image it belongs to.
        prompts: per row, the index of the prompt it was conditioned on.
        roles: per row, ``"main"`` (a row the pipeline makes) or the role of a row a
            strategy added (default: every row is main). For an added row, ``images`` is
            the main image it stands beside (its mask, its conditioning channels).
    """

    branches: tuple[Branch, ...]
    images: tuple[int, ...]
    prompts: tuple[int, ...]
    roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.roles:
            object.__setattr__(self, "roles", (MAIN_ROLE,) * len(self.branches))
        if not len(self.branches) == len(self.images) == len(self.prompts) == len(self.roles) or not self.branches:
            raise ConfigError(
                f"BatchLayout needs one branch, image, prompt and role per row; got {len(self.branches)} branches, "
                f"{len(self.images)} images, {len(self.prompts)} prompts, {len(self.roles)} roles"
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
        the UNet has no guidance embedding (``time_cond_proj_dim``), and never on a FLUX
        transformer (guidance-distilled: its ``guidance_scale`` is an input, one row per
        image; its config has ``guidance_embeds``); perturbed-attention
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
        cfg = scale > 1.0 and getattr(unet_config, "time_cond_proj_dim", None) is None and not is_flux(pipe)
        is_pag = hasattr(pipe, "set_pag_applied_layers")
        perturbed = is_pag and (3.0 if pag_scale is None else float(pag_scale)) > 0.0
        return cls.for_pipeline(num_prompts, num_images_per_prompt, cfg=cfg, perturbed=perturbed)

    def __len__(self) -> int:
        return len(self.branches)

    @property
    def num_images(self) -> int:
        """How many images the pipeline makes (main rows only)."""
        return max((i for i, role in zip(self.images, self.roles) if role == MAIN_ROLE), default=-1) + 1

    @property
    def main_rows(self) -> tuple[int, ...]:
        """Rows the pipeline makes (in batch order); rows strategies added come after them."""
        return tuple(r for r, role in enumerate(self.roles) if role == MAIN_ROLE)

    @property
    def cond_rows(self) -> tuple[int, ...]:
        """Main rows of the conditional branch, in image order."""
        return tuple(sorted((r for r in self.main_rows if self.branches[r] == "cond"), key=lambda r: self.images[r]))

    @property
    def extra_roles(self) -> tuple[str, ...]:
        """Roles of the rows strategies added, in batch order."""
        return tuple(dict.fromkeys(role for role in self.roles if role != MAIN_ROLE))

    def rows_of(self, role: str, branch: str | None = None) -> tuple[int, ...]:
        """Rows with ``role`` (and ``branch`` if given), in batch order."""
        return tuple(r for r, (ro, b) in enumerate(zip(self.roles, self.branches))
                     if ro == role and (branch is None or b == branch))

    def partner(self, row: int, role: str) -> int:
        """The row of ``role`` that stands beside ``row``: same branch, same image if it has one.

        A role with one row per branch (a reference shared by every image) is every
        image's partner. ``KeyError`` if the role has no row in that branch.
        """
        branch, image = self.branches[row], self.images[row]
        candidates = self.rows_of(role, branch)
        if not candidates:
            raise KeyError(f"no {branch} row has the role {role!r} (roles: {', '.join(dict.fromkeys(self.roles))})")
        same_image = [r for r in candidates if self.images[r] == image]
        return (same_image or candidates)[0]

    def describe(self) -> str:
        """E.g. ``2 rows (uncond x1, cond x1)``, for error messages."""
        counts = {b: self.branches.count(b) for b in BRANCHES if b in self.branches}
        text = f"{len(self)} rows ({', '.join(f'{b} x{n}' for b, n in counts.items())})"
        extra = self.extra_roles
        if extra:
            text += f", of which {len(self) - len(self.main_rows)} added by strategies ({', '.join(extra)})"
        return text

    def subset(self, rows: Sequence[int]) -> BatchLayout:
        """Layout of a batch made of ``rows`` of this one."""
        return BatchLayout(
            tuple(self.branches[r] for r in rows), tuple(self.images[r] for r in rows),
            tuple(self.prompts[r] for r in rows), tuple(self.roles[r] for r in rows),
        )

    def with_rows(self, roles: Sequence[tuple]) -> BatchLayout:
        """This layout plus added rows: per ``(role, per_image, prompt[, branches])``, one row per branch (and image).

        Added rows follow the main rows, role by role, each role in the main rows' branch
        order. ``per_image`` gives the role one row per main image per branch, else one
        row per branch (standing beside image 0). ``prompt`` is the prompt index of the
        role's conditional rows (None: the partner main row's); unconditional rows keep
        the partner's. ``branches`` (default: all of the main rows') picks the branches that get rows.
        """
        if self.extra_roles:
            raise ConfigError("rows were already added to this layout")
        main_branches = list(dict.fromkeys(self.branches))
        branches, images, prompts, role_names = list(self.branches), list(self.images), list(self.prompts), list(self.roles)
        for role, per_image, prompt, *rest in roles:
            wanted = rest[0] if rest and rest[0] is not None else main_branches
            unknown = sorted(set(wanted) - set(main_branches))
            if unknown:
                raise ConfigError(f"rows {role!r}: the branches {unknown} have no main rows in this run "
                                  f"({', '.join(main_branches)})")
            for branch in [b for b in main_branches if b in wanted]:
                for image in (range(self.num_images) if per_image else [0]):
                    partner = next(r for r in self.main_rows if self.branches[r] == branch and self.images[r] == image)
                    branches.append(branch)
                    images.append(image)
                    prompts.append(self.prompts[partner] if prompt is None or branch != "cond" else prompt)
                    role_names.append(role)
        return BatchLayout(tuple(branches), tuple(images), tuple(prompts), tuple(role_names))


def is_flux(pipe: Any) -> bool:
    """Whether ``pipe``'s network is a FLUX transformer (its config has ``guidance_embeds``, true or
    false): guidance-distilled, one row per image, T5 text only, 2x2 packed latents."""
    transformer = getattr(pipe, "transformer", None)
    return transformer is not None and "guidance_embeds" in transformer.config


def pipeline_token_indices(pipe: Any, prompt: str) -> list[int]:
    """Positions of the prompt's own tokens in the text the pipeline's network attends to.

    SD/SDXL and SD3 (whose text starts with the CLIP encoders' 77 tokens): the CLIP
    positions 1..n. FLUX (T5 text only, no start token): 1..m, the T5 tokens counted from 1,
    as the maps a joint site hands to map-reading ops put a zero column 0 in place of the
    start token (``AttentionCall.text_probs``).
    """
    if is_flux(pipe):
        t5 = pipe.tokenizer_2
        ids = t5(prompt, truncation=True, max_length=t5.model_max_length).input_ids
        return list(range(1, len(ids)))  # [t_1 .. t_m, end] -> 1..m
    return prompt_token_indices(pipe.tokenizer, prompt)


def prompt_token_indices(tokenizer: Any, prompt: str) -> list[int]:
    """Positions of the prompt's own tokens: 1..n (no start, end or padding token).

    Prompts longer than the text encoder's window are truncated as the pipeline does.
    """
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    # unpadded: [start, t_1 .. t_n, end]
    return list(range(1, len(ids) - 1))
