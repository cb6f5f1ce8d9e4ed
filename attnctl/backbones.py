"""Backbones: what attnctl needs to know about a denoising network's attention and its calls.

A backbone describes the network's attention modules as sites (``attnctl.sites``) and,
for every call of the network, reads what the run needs from the call's arguments: the
timestep in the scheduler's units, the batch size, the latent size and the token segments
(how many text and image tokens the joint attention holds). Three ship with attnctl:

- ``UNET``: diffusers' ``UNet2DConditionModel`` (SD 1.x/2.x, SDXL);
- ``SD3``: ``SD3Transformer2DModel`` (SD3, SD3.5): joint sites with the sequence
  [image, text], no rotary embedding, SD3.5 Medium's image-only ``attn2`` as ``self`` sites;
  the transformer gets the scheduler's timestep;
- ``FLUX``: ``FluxTransformer2DModel`` (FLUX.1 dev, Fill): 19 dual-stream ``joint`` and 38
  single-stream ``single`` sites with the sequence [text, image], rotary position embedding
  applied before attention; the transformer gets ``t / 1000`` (sigma) and the token grid
  in ``img_ids``.

A package adds a backbone through the ``attnctl_add_backbones`` hook. Backbones are matched
by the network's class name (exact); plugins' backbones are tried before the built-in ones.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Protocol

from attnctl.errors import UnsupportedModelError
from attnctl.sites import Site, SiteTable, describe_sites

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CallInfo:
    """What one call of the network tells the run.

    Attributes:
        timestep: the step's timestep in the scheduler's units (what ``scheduler.timesteps`` holds).
        batch: rows in the call.
        latent_hw: the latent's (H, W), from which every site's token grid follows.
        text_tokens: text tokens in the joint attention (0 for a UNet).
        image_tokens: image tokens in the joint attention (0 for a UNet).
    """

    timestep: float
    batch: int
    latent_hw: tuple[int, int]
    text_tokens: int = 0
    image_tokens: int = 0


class Backbone(Protocol):
    """What attnctl asks of a denoising network's family.

    Transformers (``is_transformer``) also give latent guidance its view of the latent:
    ``latent`` reads the step's latent from a call's arguments as ``[B, C, H, W]`` (what
    latent ops and masks work on), ``with_latent`` puts one back, ``to_sample`` turns it into
    the layout the scheduler steps (FLUX: packed tokens), and ``batch_arguments`` name the
    arguments that carry one entry per batch row.
    """

    #: short name (``unet``, ``sd3``, ``flux``), for messages and ``attnctl sites``
    name: str
    #: class names of the networks this backbone describes (exact match)
    classes: tuple[str, ...]
    #: True for transformers whose attention holds text and image tokens together
    is_transformer: bool
    #: whether the text the network attends to starts with a start token (CLIP's; FLUX's T5 text has none)
    text_start_token: bool
    #: forward arguments with one entry per batch row (transformers)
    batch_arguments: frozenset[str]
    #: the submodule whose output is the rotary position embedding ``(cos, sin)`` [S, d] of the call's tokens
    #: in attention order, or None (no rotary embedding)
    rotary_module: str | None

    def describe_sites(self, model: torch.nn.Module) -> SiteTable:
        """The model's attention modules as sites."""
        ...

    def call_info(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> CallInfo:
        """What the run needs from one call's arguments."""
        ...

    def latent(self, model: torch.nn.Module, arguments: dict) -> torch.Tensor:
        """The step's latent ``[B, C, H, W]`` in the call's (keyword) ``arguments`` (transformers)."""
        ...

    def with_latent(self, model: torch.nn.Module, arguments: dict, latent: torch.Tensor) -> dict:
        """``arguments`` with ``latent`` ``[B, C, H, W]`` in place of the step's latent (transformers)."""
        ...

    def to_sample(self, model: torch.nn.Module, arguments: dict, latent: torch.Tensor) -> torch.Tensor:
        """``latent`` ``[B, C, H, W]`` in the layout the scheduler steps (transformers)."""
        ...


def _argument(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    return args[position] if len(args) > position else kwargs.get(name)


def _first_timestep(timestep: Any) -> float:
    import torch

    return float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)


class UNetBackbone:
    """diffusers' ``UNet2DConditionModel``: self and cross sites over the UNet's levels."""

    name = "unet"
    classes = ("UNet2DConditionModel",)
    is_transformer = False
    text_start_token = True
    batch_arguments: frozenset[str] = frozenset()  # the UNet path has its own (attnctl.guidance)
    rotary_module = None

    def describe_sites(self, model):
        return describe_sites(model)

    def call_info(self, model, args, kwargs):
        sample = _argument(args, kwargs, "sample", 0)
        t = _first_timestep(_argument(args, kwargs, "timestep", 1))
        return CallInfo(t, sample.shape[0], tuple(sample.shape[-2:]))


def _matched_sites(model, pattern: re.Pattern, backbone: str, describe) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(name, kind, stage, sequence) of every attention module, in execution order.

    ``describe(match)`` gives ``(order key, kind, stage, sequence)`` for a module whose name
    ``pattern`` matches; a module it does not match is refused (a variant not supported yet).
    """
    found = []
    for name, _ in _attention_modules(model):
        m = pattern.match(name)
        if m is None:
            raise _unexpected(model, name, backbone)
        order, kind, stage, sequence = describe(m)
        found.append((order, name, kind, stage, sequence))
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__} has no attention modules to control")
    return [(name, kind, stage, sequence) for _, name, kind, stage, sequence in sorted(found)]


def _numbered(found: list[tuple[str, str, str, tuple[str, ...]]], level: int) -> SiteTable:
    """Sites in execution order, indexed per kind: ``found`` is (name, kind, stage, sequence)."""
    counts: dict[str, int] = {}
    sites = []
    for name, kind, stage, sequence in found:
        sites.append(Site(name, kind, stage, counts.get(kind, 0), level, sequence=sequence))
        counts[kind] = counts.get(kind, 0) + 1
    return SiteTable(sites)


def _attention_modules(model) -> Iterable[tuple[str, Any]]:
    """Modules with a settable attention processor (diffusers' ``Attention`` and ``AttentionModuleMixin``)."""
    for name, module in model.named_modules():
        if callable(getattr(module, "set_processor", None)) and hasattr(module, "processor"):
            yield name, module


def _unexpected(model, name: str, backbone: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"attention module '{name}' of {type(model).__name__} is not where the {backbone} backbone expects one "
        "(transformer_blocks.N.attn / attn2, single_transformer_blocks.N.attn); this variant is not supported yet"
    )


_SD3_RE = re.compile(r"^transformer_blocks\.(\d+)\.(attn|attn2)$")


class SD3Backbone:
    """``SD3Transformer2DModel``: one joint site [image, text] per block, SD3.5 Medium's ``attn2`` as self sites."""

    name = "sd3"
    classes = ("SD3Transformer2DModel",)
    is_transformer = True
    text_start_token = True  # the text starts with the CLIP encoders' 77 tokens
    batch_arguments = frozenset({"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                 "block_controlnet_hidden_states"})
    rotary_module = None  # absolute positions, added once before the blocks

    def describe_sites(self, model):
        def site(m: re.Match) -> tuple:  # (block, attn before attn2): their execution order
            if m.group(2) == "attn":
                return (int(m.group(1)), 0), "joint", "joint", ("img", "txt")
            return (int(m.group(1)), 1), "self", "joint", ("img",)

        return _numbered(_matched_sites(model, _SD3_RE, "SD3", site), int(math.log2(model.config.patch_size)))

    def call_info(self, model, args, kwargs):
        hidden = _argument(args, kwargs, "hidden_states", 0)
        text = _argument(args, kwargs, "encoder_hidden_states", 1)
        t = _first_timestep(_argument(args, kwargs, "timestep", 3))
        p = model.config.patch_size
        h, w = hidden.shape[-2:]
        return CallInfo(t, hidden.shape[0], (h, w), text.shape[1], (h // p) * (w // p))

    # the input is the latent (channels first), then any conditioning channels of an inpainting variant
    def latent(self, model, arguments):
        return arguments["hidden_states"][:, : model.config.out_channels]

    def with_latent(self, model, arguments, latent):
        import torch

        hidden = arguments["hidden_states"]
        extra = hidden[:, model.config.out_channels :]
        latent = latent.to(hidden.dtype)
        return {**arguments, "hidden_states": torch.cat([latent, extra], dim=1) if extra.shape[1] else latent}

    def to_sample(self, model, arguments, latent):
        return latent


#: named site sets of FLUX.1 (19 joint + 38 single sites), by place in execution order
FLUX_PRESETS = {
    # Stable Flow (Avrahami et al., 2025): the layers whose bypass changes the image most
    "vital": (0, 1, 17, 18, 25, 28, 53, 54, 56),
}

_FLUX_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn$")


class FluxBackbone:
    """``FluxTransformer2DModel``: joint sites (dual-stream), then single sites, each [text, image]."""

    name = "flux"
    classes = ("FluxTransformer2DModel",)
    is_transformer = True
    text_start_token = False  # T5 text only
    batch_arguments = frozenset({"hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance",
                                 "controlnet_block_samples", "controlnet_single_block_samples"})
    rotary_module = "pos_embed"  # of the ids [txt_ids; img_ids]: text then image, the attention order

    def describe_sites(self, model):
        def site(m: re.Match) -> tuple:  # dual-stream blocks run before single-stream ones
            kind = "single" if m.group(1) == "single_transformer_blocks" else "joint"
            return (kind == "single", int(m.group(2))), kind, kind, ("txt", "img")

        # the pipeline packs 2x2 latent pixels into one token
        table = _numbered(_matched_sites(model, _FLUX_RE, "FLUX", site), 1)
        if len(table) == 57:  # FLUX.1's 19 + 38 blocks: the published layer lists refer to them
            table.presets.update({name: tuple(table[i].name for i in order) for name, order in FLUX_PRESETS.items()})
        return table

    def call_info(self, model, args, kwargs):
        hidden = _argument(args, kwargs, "hidden_states", 0)
        text = _argument(args, kwargs, "encoder_hidden_states", 1)
        img_ids = _argument(args, kwargs, "img_ids", 4)
        # the pipeline hands the transformer t / 1000; the scheduler counts in t
        t = _first_timestep(_argument(args, kwargs, "timestep", 3)) * 1000.0
        if img_ids is None:
            raise UnsupportedModelError("FluxTransformer2DModel was called without img_ids; attnctl reads the "
                                        "token grid from them")
        grid = _flux_grid(img_ids, hidden.shape[1])
        return CallInfo(t, hidden.shape[0], (2 * grid[0], 2 * grid[1]), text.shape[1], hidden.shape[1])

    # the input is 2x2-packed latent tokens (channels last), then FLUX Fill's conditioning channels
    def latent(self, model, arguments):
        hidden = arguments["hidden_states"]
        h, w = _flux_grid(arguments["img_ids"], hidden.shape[1])
        packed = hidden[..., : model.config.out_channels]
        b, c = hidden.shape[0], model.config.out_channels // 4
        return packed.reshape(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * h, 2 * w)

    def with_latent(self, model, arguments, latent):
        import torch

        hidden = arguments["hidden_states"]
        packed = self.to_sample(model, arguments, latent).to(hidden.dtype)
        return {**arguments, "hidden_states": torch.cat([packed, hidden[..., model.config.out_channels :]], dim=-1)}

    def to_sample(self, model, arguments, latent):
        b, c, h2, w2 = latent.shape
        h, w = h2 // 2, w2 // 2
        return latent.reshape(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * 4)


def _flux_grid(img_ids: Any, tokens: int) -> tuple[int, int]:
    """The token grid (rows, columns) ``img_ids`` describe; refuses reference tokens (FLUX Kontext's)."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if bool((ids[:, 0] != 0).any()):
        raise UnsupportedModelError(
            "this FLUX call carries reference-image tokens (img_ids with a non-zero first axis, as FLUX "
            "Kontext's); attnctl's FLUX backbone supports FLUX.1 dev and Fill so far"
        )
    grid = (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
    if grid[0] * grid[1] != tokens:
        raise UnsupportedModelError(f"img_ids describe a {grid[0]}x{grid[1]} token grid but the call has {tokens} "
                                    "image tokens")
    return grid


UNET, SD3, FLUX = UNetBackbone(), SD3Backbone(), FluxBackbone()
BUILTIN_BACKBONES: tuple[Backbone, ...] = (UNET, SD3, FLUX)


def find_backbone(model: Any, extra: Iterable[Backbone] = ()) -> Backbone:
    """The backbone describing ``model`` (plugins' first, then the built-ins), matched by class name.

    Raises:
        UnsupportedModelError: no backbone knows the model's class.
    """
    name = type(model).__name__
    known = [*reversed(list(extra)), *BUILTIN_BACKBONES]
    for backbone in known:
        if name in backbone.classes:
            return backbone
    if all(hasattr(model, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        return UNET  # a UNet of another class (a subclass, a user's): its sites are read the same way
    classes = sorted({c for b in known for c in b.classes})
    raise UnsupportedModelError(
        f"{name} is not a UNet with down/mid/up blocks, and attnctl has no backbone for it; it knows "
        f"{', '.join(classes)}. Pass a diffusers pipeline with one of those as .unet or .transformer, or add a "
        "backbone through a plugin's attnctl_add_backbones hook (docs/architecture.md)"
    )


def denoiser_of(target: Any) -> Any:
    """The denoising network of a pipeline (``.unet`` or ``.transformer``), or ``target`` itself."""
    for attribute in ("unet", "transformer"):
        model = getattr(target, attribute, None)
        if model is not None:
            return model
    return target
