"""``attentive_eraser``: object removal by attention activation and suppression (Attentive Eraser).

Sun et al., arXiv 2412.12974, as their ``AAS`` attention editor and pipeline compute it. The
output image ("w") and a copy of it ("wo", same latent and text) are denoised side by side,
without classifier-free guidance. At the selected self-attention sites (the decoder's, as
theirs) and on the output rows only:

- keys inside the mask are excluded (their logits get ``finfo.min``: weight exactly 0);
- during the first ``ss_steps + 1`` steps, queries inside the mask also have their logits
  scaled by ``ss_scale`` (their ``sim_fg = ss_scale * sim``, blended in by the mask per query);

and where the mask covers a site's whole grid (a large object at a coarse grid), every key is
masked: their ``finfo.min`` then absorbs the logits and the attention is uniform, which the
plugin reproduces (zero queries, no exclusion). The noise predictions combine by
self-attention redirection guidance (SARG):
``eps = eps_wo + rm_guidance_scale * (eps_w - eps_wo)``. The masks at each grid are the
latent-size mask max-pooled to it and rounded, as theirs.

Fused: the logit scale on masked queries is a projection of those queries (stage 0), the key
exclusion a renormalized reweight ``W = 1 (1 - m)^T`` (stage 2), so the site stays one fused
attention call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import attnctl
from attnctl.errors import ConfigError, RunError
from attnctl.layout import MAIN_ROLE
from attnctl.ops import MAIN, ProjectionOp, ReweightOp
from attnctl.params import StrategySpec
from attnctl.rows import RowOp, RowSpec
from attnctl.sites import SiteTable
from attnctl.step_ops import GuidanceTermOp
from strategies._attention_sites import self_attention_sites

if TYPE_CHECKING:
    import torch

    from attnctl.call import AttentionCall

NAME = "attentive_eraser"


@dataclass(frozen=True)
class AttentiveEraserParams:
    """Parameters of ``attentive_eraser`` (defaults: the authors' README and main.py)."""

    sites: str = field(default="self@up", metadata={"help": "self-attention sites edited (theirs: the decoder)"})
    ss_steps: int = field(default=9, metadata={"help": "similarity suppression on steps 0..ss_steps"})
    ss_scale: float = field(default=0.3, metadata={"help": "logit scale of queries inside the mask"})
    rm_guidance_scale: float = field(default=9.0, metadata={"help": "SARG scale: eps_wo + s (eps_w - eps_wo)"})

    def __post_init__(self) -> None:
        if self.ss_steps < -1:
            raise ConfigError(f"ss_steps must be -1 (no suppression) or more, got {self.ss_steps}")


SPEC = StrategySpec(NAME, "Attentive Eraser: remove the masked object by redirecting self-attention",
                    AttentiveEraserParams)


def _all_masked(call: AttentionCall) -> torch.Tensor:
    """[B] 1 for rows whose mask covers the whole grid at this site."""
    mask = _site_mask(call)
    return call.memo((NAME, "all"), lambda: (mask.amin(dim=1) == 1).to(mask.dtype))


def _site_mask(call: AttentionCall) -> torch.Tensor:
    """[B, H*W] the latent-size mask max-pooled to the site's grid and rounded (theirs), per row."""
    import torch.nn.functional as F

    def make():
        h0, w0 = call.state.latent_hw
        h, w = call.state.grid(call.site)
        latent = call.state.masks_for_rows(0, call.rows, call.query.device).reshape(-1, 1, h0, w0)
        return F.max_pool2d(latent, (h0 // h, w0 // w)).round().reshape(-1, h * w)

    return call.memo((NAME, "mask"), make)


@dataclass(eq=False)
class SuppressQueries(ProjectionOp):
    """Queries inside the mask scaled by ``ss_scale`` on the output rows (their similarity suppression)."""

    scale: float = field(default=0.3, kw_only=True)
    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def project(self, call):
        rows = call.rows_of(MAIN_ROLE)  # the output rows ("w")
        on = _site_mask(call)[rows][:, None, :, None].to(call.query.dtype)  # [n, 1, HW, 1]
        query = call.query.clone()
        query[rows] = call.query[rows] * (1 + (self.scale - 1) * on)
        call.set_query(query)


@dataclass(eq=False)
class UniformWhereAllMasked(ProjectionOp):
    """Output rows whose mask covers the site's whole grid attend uniformly (queries set to 0).

    Their editor adds ``finfo.min`` to the logits of masked keys; when every key is masked the
    penalty absorbs the logits (``sim + finfo.min == finfo.min`` in fp32 and fp64), so every key
    gets the same weight. Reproduced exactly, and with no host sync, by zero queries.
    """

    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def project(self, call):
        rows = call.rows_of(MAIN_ROLE)  # the output rows ("w")
        full = _all_masked(call)[rows][:, None, None, None].to(call.query.dtype)
        query = call.query.clone()
        query[rows] = call.query[rows] * (1 - full)
        call.set_query(query)


@dataclass(eq=False)
class ExcludeObjectKeys(ReweightOp):
    """The output rows' attention to keys inside the mask is 0 (renormalized over the others)."""

    renormalize: bool = field(default=True, kw_only=True)
    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def factors(self, call):
        def make():
            # a row whose mask covers the grid excludes nothing: there their finfo.min penalty is on every
            # key and absorbs the logits, which makes the attention uniform (ZeroQueries does that)
            drop = _site_mask(call) * (1 - _all_masked(call))[:, None] * call.on_rows(MAIN_ROLE).flatten()[:, None]
            return (1 - drop)[:, None, :, None]  # per own key; 1 on the other rows

        b = call.memo((NAME, "keep"), make)
        one = call.query.new_ones(1, 1, 1, 1)
        return [(one, b.to(call.value.dtype))]


@dataclass(frozen=True)
class _UpTo:
    """Gate: step index <= ``last`` (their ``cur_step <= ss_steps``)."""

    last: int

    def __call__(self, state: Any) -> bool:
        return state.step_index is not None and state.step_index <= self.last

    def __str__(self) -> str:
        return f"step <= {self.last}"


@dataclass(eq=False)
class RedirectionGuidance(GuidanceTermOp):
    """SARG, ``eps_wo + s (eps_w - eps_wo)``, as the term ``(s - 1) (eps_w - eps_wo)`` added to ``eps_w``."""

    scale: float = field(default=9.0, kw_only=True)

    def term(self, eps, base, ctx):
        import torch

        lay = ctx.state.layout
        if any(b == "uncond" for b in lay.branches):
            raise RunError(f"strategies.{self.strategy}: Attentive Eraser runs without classifier-free guidance, as "
                           "its authors'; set sampler.guidance_scale=1 (the recipe attentive-eraser does)")
        out = []
        for image in range(lay.num_images):
            w = next(r for r in lay.main_rows if lay.images[r] == image)
            out.append((self.scale - 1) * (eps[w] - eps[lay.partner(w, self.strategy)]))
        return torch.stack(out)


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: AttentiveEraserParams, sites: SiteTable):
    if spec.name != NAME:
        return None
    ops: list = [RowOp(instance, row=RowSpec(role=instance, driver="shared")),
                 RedirectionGuidance(instance, scale=params.rm_guidance_scale)]
    suppress = (_UpTo(params.ss_steps),)
    for site in self_attention_sites(params.sites, sites, f"strategies.{instance}"):
        if params.ss_steps >= 0 and params.ss_scale != 1.0:
            ops.append(SuppressQueries(instance, site=site, scale=params.ss_scale, gates=suppress))
        ops += [UniformWhereAllMasked(instance, site=site), ExcludeObjectKeys(instance, site=site)]
    return ops
