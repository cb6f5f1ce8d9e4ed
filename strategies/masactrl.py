"""``masactrl``: mutual self-attention (MasaCtrl, Cao et al. 2023), as the authors' code computes it.

A source image is denoised beside the main ones (its own prompt, the main image's initial
latent and mask; role = the instance name); with ``source_image`` it is a real image instead:
DDIM-inverted, the source and the output start from its inverted latent and the source is
denoised with its (usually empty) prompt, as the authors' real-image editing does, or it
follows the inversion step by step (``follow_inversion``, their commented-out option). At the chosen self-attention sites and steps,
with ``s`` the source row of the same CFG branch and image and ``m`` the binary mask at
the site's grid (1 = inpaint; the source row has its main image's mask, so ``m_s = m_t``)::

    plain:  out_r = softmax(Q_r K_s^T / sqrt(d)) V_s              every row (the source: itself)
    union:  out_t = softmax(Q_t [K_s; K_t]^T / sqrt(d)) [V_s; V_t]
    mask:   out_t = m_t ⊙ softmax(Q_t K_s^T / sqrt(d) + F_fg) V_s + (1 - m_t) ⊙ (same with F_bg)

``F_fg`` is ``finfo.min`` on keys outside ``m_s`` (``F_bg``: inside); source rows keep their
own self-attention. Plain = a projection op (own K,V <- the source's); union = a key/value
op appending the source's K,V (bias -inf on the source rows); mask = the projection plus a
renormalized rank-2 reweight ``W = m_t m_s^T + (1-m_t)(1-m_s)^T`` (exact for binary masks:
a renormalized zero weight is a -inf logit). A query whose restricted key set is empty
gets what the ``finfo.min`` fill gives, a uniform softmax over all source keys (a branch
op); with ``m_s = m_t`` that cannot happen (a query's own position is in its set).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import attnctl
from attnctl.errors import ConfigError, did_you_mean
from attnctl.ops import MAIN, Branch, BranchOp, KeyValueOp, ProjectionOp, ReweightOp
from attnctl.params import StrategySpec, help_text as _h
from attnctl.rows import RowOp, RowSpec
from attnctl.sites import Site, SiteTable
from strategies._attention_sites import grid_tokens, self_attention_sites
from strategies._images import open_image

if TYPE_CHECKING:
    import torch

    from attnctl.call import AttentionCall
    from attnctl.interfaces import RunView

NAME = "masactrl"
VARIANTS = ("plain", "union", "mask")
DEFAULT_SITES = "self[-6:]"  # the authors' layers 10-15 of 16 on SD 1.x/2.x (decoder 32x32 and 64x64 at 512 px)


@dataclass(frozen=True)
class MasaCtrlParams:
    """Parameters of ``masactrl``."""

    source_prompt: str | None = field(default=None, metadata=_h("prompt of the source image (required)"))
    sites: str | None = field(default=None, metadata=_h(f"self-attention sites (selector; default {DEFAULT_SITES})"))
    start_layer: int | None = field(default=None, metadata=_h(
        "instead of sites: the authors' start_layer (blocks counted in execution order; SD 10, SDXL 44/54/64)"))
    start_step: int = field(default=4, metadata=_h("first denoising step index it acts at"))
    end_step: int | None = field(default=None, metadata=_h("step index it stops before (null: the last step)"))
    variant: str = field(default="plain", metadata=_h(f"key/value source: {', '.join(VARIANTS)}"))
    keep_source: bool = field(default=False, metadata=_h("publish the source latent in row_outputs"))
    source_image: str | None = field(default=None, metadata=_h(
        "path of a real source image, DDIM-inverted and followed instead of a generated source"))
    inversion_guidance: float = field(default=7.5, metadata=_h(
        "with source_image: guidance scale of the inversion (the authors' 7.5; the empty prompt as uncond)"))
    start_from_source: bool = field(default=True, metadata=_h(
        "with source_image: the output starts from the source's inverted latent, as the authors' real-image editing"))
    follow_inversion: bool = field(default=False, metadata=_h(
        "with source_image: the source takes the inverted latent every step (their commented-out option) "
        "instead of being denoised from the inverted start (their default)"))

    def __post_init__(self) -> None:
        if not self.source_image and not (self.source_prompt or "").strip():
            raise ConfigError("source_prompt is missing; set it to the text of the source image, "
                              "e.g. source_prompt='a photo of a cat, sitting' (or give source_image)")
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant '{self.variant}'{did_you_mean(self.variant, VARIANTS)}; "
                              f"choose one of {', '.join(VARIANTS)}")
        if self.sites is not None and self.start_layer is not None:
            raise ConfigError("give sites or start_layer, not both (start_layer selects the sites)")
        end = self.start_step + 1 if self.end_step is None else self.end_step
        if min(self.start_step, self.start_layer or 0) < 0 or end <= self.start_step:
            raise ConfigError(f"need 0 <= start_step < end_step and start_layer >= 0; got start_step="
                              f"{self.start_step}, end_step={self.end_step}, start_layer={self.start_layer}")


SPEC = StrategySpec(NAME, "MasaCtrl: mutual self-attention to a source image's K/V (plain, union, mask-guided)",
                    MasaCtrlParams)


@dataclass(eq=False)
class SourceKV(ProjectionOp):
    """Own K,V <- the source row's (the source rows map to themselves)."""

    def project(self, call: AttentionCall) -> None:
        call.set_own_kv(call.take(call.key, self.strategy), call.take(call.value, self.strategy))


def _is_source(call: AttentionCall, role: str) -> torch.Tensor:
    """[B] bool: the source rows (the rows of ``role``: each is its own partner)."""
    import torch

    return torch.tensor([r == role for r in call.layout.roles], device=call.query.device)


@dataclass(eq=False)
class UnionKV(KeyValueOp):
    """Appends the source row's K,V; on the source rows with bias -inf (they stay unchanged)."""

    def extend(self, call: AttentionCall) -> None:
        role = self.strategy
        bias = call.memo((NAME, role, "union"), lambda: (~_is_source(call, role)).float().log()[:, None, None, None])
        call.append_keys(call.take(call.own_key, role), call.take(call.own_value, role), bias)


def _mask_terms(call: AttentionCall, role: str):
    """(factors of W, per-query weight of the uniform fallback or None) for the call's rows, once per run."""
    import torch

    def compute():
        grid_tokens(call)
        m, src = call.mask(), _is_source(call, role)[:, None]
        m_s = call.take(m, role)
        fg_empty, bg_empty = m_s.sum(-1, keepdim=True) == 0, m_s.sum(-1, keepdim=True) == m.shape[-1]
        a_fg = torch.where(src, 1.0, m)  # source rows: W = 1 1^T + 0
        b_fg, b_bg = torch.where(src | fg_empty, 1.0, m_s), torch.where(bg_empty, 1.0, 1.0 - m_s)
        uniform = ~src & (((m > 0) & fg_empty) | ((m == 0) & bg_empty))
        col = lambda x: x.float()[:, None, :, None]  # noqa: E731
        return [(col(a_fg), col(b_fg)), (col(1.0 - a_fg), col(b_bg))], col(uniform) if bool(uniform.any()) else None

    return call.memo((NAME, role, "mask"), compute)


@dataclass(eq=False)
class MaskReweight(ReweightOp):
    """Target rows: ``W = m_t m_s^T + (1-m_t)(1-m_s)^T`` over the source's keys (renormalized)."""

    def factors(self, call: AttentionCall):
        return _mask_terms(call, self.strategy)[0]


@dataclass(eq=False)
class EmptySetFallback(BranchOp):
    """Queries whose restricted key set is empty: the mean of the source's values (a uniform softmax)."""

    def main_weight(self, call: AttentionCall) -> torch.Tensor | None:
        u = _mask_terms(call, self.strategy)[1]
        return None if u is None else 1.0 - u

    def branches(self, call: AttentionCall) -> list[Branch]:
        u = _mask_terms(call, self.strategy)[1]
        return [] if u is None else [Branch(u, key=call.own_key.new_zeros(call.own_key.shape), value=call.own_value)]


def masactrl_sites(params: MasaCtrlParams, sites: SiteTable, where: str) -> list[Site]:
    """``params.sites``, or the self sites of blocks >= ``start_layer`` (block = attention call // 2)."""
    if params.start_layer is None:
        return self_attention_sites(params.sites or DEFAULT_SITES, sites, where)
    selfs, n_cross = sites.of_kind("self"), len(sites.of_kind("cross"))
    if len(selfs) != n_cross or params.start_layer >= len(selfs):
        raise ConfigError(f"{where}.start_layer={params.start_layer}: this model has {len(selfs)} self and {n_cross} "
                          "cross sites; start_layer counts blocks of one self + one cross site (0 .. blocks-1), "
                          "as the authors do; pick a smaller start_layer or use sites (a selector) instead")
    return [s for s in selfs if s.index >= params.start_layer]


def _source_row(instance: str, params: MasaCtrlParams) -> RowSpec:
    """The source: generated from its prompt, or a real image followed along its DDIM inversion
    (the authors' real-image editing: their source prompt is usually empty)."""
    if not params.source_image:
        return RowSpec(instance, prompt=params.source_prompt, output=params.keep_source)
    image = open_image(params.source_image, f"strategies.{instance}.source_image")
    return RowSpec(instance, prompt=params.source_prompt or "", driver="inverted", image=image, per_image=False,
                   inversion_guidance=params.inversion_guidance, start_main=params.start_from_source,
                   follow_inversion=params.follow_inversion, output=params.keep_source)


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: MasaCtrlParams, sites: SiteTable):
    if spec.name != NAME:
        return None
    start, end = params.start_step, float("inf") if params.end_step is None else params.end_step

    def due(state: RunView) -> bool:  # the authors' step_idx = range(start_step, total_steps)
        return state.step_index is not None and start <= state.step_index < end

    ops: list = [RowOp(instance, row=_source_row(instance, params))]
    for site in masactrl_sites(params, sites, f"strategies.{instance}"):
        kw = dict(site=site, gates=(due,), passes=frozenset({MAIN}))
        ops.append((UnionKV if params.variant == "union" else SourceKV)(instance, **kw))
        if params.variant == "mask":
            ops += [MaskReweight(instance, renormalize=True, **kw), EmptySetFallback(instance, **kw)]
    return ops
