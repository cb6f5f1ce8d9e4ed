"""Sites: a stable description of every attention module of a UNet or a diffusion transformer.

Sites are numbered per kind (``self`` / ``cross``) in *execution* order: down blocks,
then the mid block, then up blocks; inside a block by attention index, then by
transformer-block index. ``unet.attn_processors`` is in registration order (down, up,
mid) and is deliberately not used for numbering.

A site's token grid is known only at run time (it depends on the latent size); what is
known at attach time is its *level*: how many times the latent was downsampled before
it. ``grid_at(level, latent_hw)`` turns that into (H, W) the way the UNet's stride-2
convolutions do (ceil division), so the grid is never guessed from ``sqrt(seq_len)``.

On a diffusion transformer (``attnctl.backbones``) a site may hold text and image tokens
in one attention: its ``kind`` is ``joint`` (a dual-stream block, text and image with their
own projections) or ``single`` (a single-stream block), its ``sequence`` names the token
segments in the order the module concatenates them, and its ``blocks`` name the
query>key blocks of the attention matrix it holds (``img>img``, ``img>txt``, ...). Every
image site of a transformer sees one token grid (level = log2 of its patch size).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal, Sequence

from attnctl.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

SiteKind = Literal["self", "cross", "joint", "single"]
SITE_KINDS: tuple[str, ...] = ("self", "cross", "joint", "single")
Stage = Literal["down", "mid", "up", "joint", "single"]
_STAGE_RANK = {"down": 0, "mid": 1, "up": 2}
#: the query>key blocks of a site of each kind (rows: queries, columns: keys)
JOINT_BLOCKS = ("img>img", "img>txt", "txt>img", "txt>txt")
_DEFAULT_BLOCKS = {"self": ("img>img",), "cross": ("img>txt",), "joint": JOINT_BLOCKS, "single": JOINT_BLOCKS}
_BLOCK_RE = re.compile(r"^(down_blocks|mid_block|up_blocks)(?:\.(\d+))?\.")


@dataclass(frozen=True)
class Site:
    """One attention module of the model.

    Attributes:
        name: fully qualified module name, e.g. ``down_blocks.1.attentions.0.transformer_blocks.0.attn1``.
        kind: ``"self"`` or ``"cross"`` (UNets; a transformer's image-only attention is ``self``
            too), ``"joint"`` or ``"single"`` (text and image tokens in one attention).
        stage: ``"down"``, ``"mid"`` or ``"up"`` (UNets); ``"joint"`` or ``"single"``: the kind of
            transformer block the site is in.
        index: 0-based execution-order index among sites of the same kind.
        level: number of 2x downsamplings between the latent and this site's token grid.
        sequence: the token segments of the module's attention sequence in its order, e.g.
            ``("txt", "img")`` for FLUX, ``("img", "txt")`` for SD3; ``("img",)`` when the
            queries and keys are image tokens only, ``()`` for UNet cross-attention (text keys
            come from ``encoder_hidden_states``).
        blocks: the query>key blocks of the attention matrix this site holds.
    """

    name: str
    kind: SiteKind
    stage: Stage
    index: int
    level: int
    sequence: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.blocks:
            object.__setattr__(self, "blocks", _DEFAULT_BLOCKS[self.kind])
        if not self.sequence and self.kind == "self":
            object.__setattr__(self, "sequence", ("img",))

    @property
    def is_joint(self) -> bool:
        """True where one attention holds more than one token segment (text and image)."""
        return len(self.sequence) > 1

    def acts_as(self, kind: str) -> bool:
        """Whether a selector's ``kind`` picks this site: its own kind, or on a joint site ``self``
        (it has an img>img block) and ``cross`` (it has an img>txt block)."""
        if kind in ("*", self.kind):
            return True
        return (kind == "self" and "img>img" in self.blocks) or (kind == "cross" and "img>txt" in self.blocks)

    @property
    def key(self) -> str:
        """Short unique label, e.g. ``self[3]``."""
        return f"{self.kind}[{self.index}]"

    def grid(self, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid (H, W) of this site for a latent of size ``latent_hw``."""
        return grid_at(self.level, latent_hw)


def grid_at(level: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Token grid after ``level`` stride-2 downsamplings (kernel 3, padding 1: ceil)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


class SiteTable(Sequence[Site]):
    """All sites of a model: a UNet's self sites then its cross sites, a transformer's in execution order."""

    def __init__(self, sites: Sequence[Site], presets: dict[str, tuple[str, ...]] | None = None):
        self._sites = tuple(sites)
        self._by_name = {s.name: s for s in self._sites}
        #: named site sets of this model (``self@vital``): preset name -> site names
        self.presets: dict[str, tuple[str, ...]] = dict(presets or {})

    def __getitem__(self, i):  # type: ignore[override]
        return self._sites[i]

    def __len__(self) -> int:
        return len(self._sites)

    def __iter__(self) -> Iterator[Site]:
        return iter(self._sites)

    def of_kind(self, kind: SiteKind) -> list[Site]:
        """Sites of one kind, in execution order."""
        return [s for s in self._sites if s.kind == kind]

    def by_name(self, name: str) -> Site:
        """Site with module name ``name``."""
        return self._by_name[name]

    @property
    def levels(self) -> set[int]:
        """Every level some site runs at."""
        return {s.level for s in self._sites}

    def format(self, latent_hw: tuple[int, int] | None = None) -> str:
        """Human-readable table, one site a line (used in error messages and ``attnctl sites``)."""
        lines = []
        for s in self._sites:
            grid = ""
            if latent_hw is not None:
                gh, gw = s.grid(latent_hw)
                grid = f"  {gh}x{gw}"
            if s.stage in _STAGE_RANK:
                lines.append(f"{s.key:<10} {s.stage:<4} level={s.level}{grid}  {s.name}")
            else:  # a transformer's: which stream, and the blocks the site holds
                lines.append(f"{s.key:<10} {s.stage:<6} level={s.level}{grid}  {s.name:<36} {' '.join(s.blocks)}")
        return "\n".join(lines)


def _natural_key(name: str) -> tuple:
    """Sort key comparing the numeric parts of a dotted module name as numbers."""
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def _block_levels(unet: torch.nn.Module) -> dict[tuple[str, int], int]:
    """Level of every down/mid/up block, read from where the UNet has its resamplers."""
    levels: dict[tuple[str, int], int] = {}
    level = 0
    for i, block in enumerate(unet.down_blocks):
        levels[("down_blocks", i)] = level
        if getattr(block, "downsamplers", None):
            level += 1
    levels[("mid_block", 0)] = level
    for i, block in enumerate(unet.up_blocks):
        levels[("up_blocks", i)] = level
        if getattr(block, "upsamplers", None):
            level -= 1
    return levels


def describe_sites(unet: torch.nn.Module) -> SiteTable:
    """Describe every attention module of a diffusers ``UNet2DConditionModel``.

    Raises:
        UnsupportedModelError: the model is not a UNet with down/mid/up blocks, or it has
            attention modules outside them.
    """
    from diffusers.models.attention_processor import Attention

    if not all(hasattr(unet, a) for a in ("down_blocks", "up_blocks", "mid_block")):
        raise UnsupportedModelError(
            f"{type(unet).__name__} is not a UNet with down/mid/up blocks; attnctl attaches to "
            "diffusers UNet2DConditionModel (SD 1.x/2.x, SDXL). Pass pipe.unet of such a pipeline."
        )
    levels = _block_levels(unet)
    found: list[tuple[str, str, str, int]] = []
    for name, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        m = _BLOCK_RE.match(name)
        if m is None:
            raise UnsupportedModelError(
                f"attention module '{name}' is outside the down/mid/up blocks; this model layout "
                "is not supported yet"
            )
        block_kind, block_idx = m.group(1), int(m.group(2) or 0)
        stage = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[block_kind]
        kind = "cross" if module.is_cross_attention else "self"
        found.append((name, kind, stage, levels[(block_kind, block_idx)]))
    if not found:
        raise UnsupportedModelError(f"{type(unet).__name__} has no attention modules to control")
    found.sort(key=lambda f: (_STAGE_RANK[f[2]], _natural_key(f[0])))
    sites: list[Site] = []
    for kind in ("self", "cross"):
        ordered = [f for f in found if f[1] == kind]
        sites += [Site(name, kind, stage, i, level) for i, (name, _, stage, level) in enumerate(ordered)]
    return SiteTable(sites)
