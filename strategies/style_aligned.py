"""``style_aligned``: shared self-attention with AdaIN against a reference image (StyleAligned).

Hertz, Voynov, Fruchter, Cohen-Or (arXiv 2312.02133), as their code computes it. A
reference image is denoised beside the main ones (its own prompt and noise, one row per
CFG branch). At every selected self-attention site and step, on head-split ``[B, h, N, d]``
tensors, with ``x_ref`` the reference row of the same branch::

    mu(x) = mean of x over tokens;  sigma(x) = sqrt(unbiased var of x over tokens + 1e-5)
    AdaIN(x) = (x - mu(x)) / sigma(x) * sigma(x_ref) + mu(x_ref)     per row, head, channel
    Q <- AdaIN(Q), K <- AdaIN(K)          (switches adain_queries / adain_keys / adain_values)
    logits = [Q K^T / sqrt(d) ;  Q (s K_ref)^T / sqrt(d) + shift]    (own keys, then appended)
    out = softmax(logits) [V ; V_ref]

with ``s = shared_score_scale`` on every row but the reference rows (which append their own
keys unscaled: duplicated keys leave their output unchanged) and ``shift`` (shared_score_shift)
on every row. AdaIN also runs on the reference (the identity up to rounding), as in their
code; it is skipped at a single-token site (tiny models), where the unbiased var is undefined.

The reference is an added row (``attnctl.rows``) whose role is the instance name: generated
beside the main images (driver ``free``), or with ``reference_image`` a real image followed
along its DDIM inversion (driver ``inverted``; their transfer notebook: inversion guidance 2,
the reference starting 5 steps less noisy). A projection op does the AdaIN, a key/value op
appends the reference's (projected) keys and values with an additive bias ``shift`` (none
when it is 0, so the site stays one fused call); both act in the main pass only. With
``share_group_norm`` (their default) a feature op makes every GroupNorm of the UNet
normalize each row together with its reference row (``attnctl.feature_ops``); their
``share_layer_norm`` is not needed: LayerNorm normalizes each token alone, so concatenating
tokens changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import attnctl
from attnctl.errors import ConfigError
from attnctl.feature_ops import FeatureCall, FeatureOp
from attnctl.ops import MAIN, KeyValueOp, ProjectionOp
from attnctl.params import StrategySpec
from attnctl.rows import RowOp, RowSpec
from attnctl.sites import SiteTable
from strategies._attention_sites import self_attention_sites
from strategies._images import open_image

if TYPE_CHECKING:
    import torch

    from attnctl.call import AttentionCall

NAME = "style_aligned"
EPS = 1e-5  # inside the sqrt, as in their calc_mean_std


@dataclass(frozen=True)
class StyleAlignedParams:
    """Parameters of ``style_aligned``."""

    reference_prompt: str = field(default="", metadata={"help": "prompt of the reference image (required)"})
    reference_seed: int = field(default=0, metadata={"help": "seed of the reference image's initial noise"})
    sites: str = field(default="self", metadata={"help": "self-attention sites to share (selector)"})
    adain_queries: bool = field(default=True, metadata={"help": "AdaIN of the queries against the reference's"})
    adain_keys: bool = field(default=True, metadata={"help": "AdaIN of the keys against the reference's"})
    adain_values: bool = field(default=False, metadata={"help": "AdaIN of the values against the reference's"})
    shared_score_scale: float = field(default=1.0, metadata={"help": "scale of appended keys (not the reference's)"})
    shared_score_shift: float = field(default=0.0, metadata={"help": "added to the appended keys' logits (all rows)"})
    share_group_norm: bool = field(default=True, metadata={
        "help": "every GroupNorm's statistics over the image and its reference together (theirs; off in their SDXL demo)"})
    keep_reference: bool = field(default=False, metadata={"help": "keep its latent: row_outputs[<instance>]"})
    reference_image: str | None = field(default=None, metadata={
        "help": "path of a real reference image, DDIM-inverted and followed instead of a generated one"})
    inversion_guidance: float = field(default=2.0, metadata={
        "help": "with reference_image: guidance scale of the inversion (their transfer notebook's 2)"})
    inversion_offset: int = field(default=5, metadata={
        "help": "with reference_image: steps the reference starts less noisy (their transfer callback's 5)"})

    def __post_init__(self) -> None:
        if not self.reference_image and not self.reference_prompt.strip():
            raise ConfigError("reference_prompt is empty; set it to the text of the style reference, "
                              "e.g. reference_prompt='a house, in minimal origami style' (or give reference_image)")
        if self.inversion_offset < 0:
            raise ConfigError(f"inversion_offset must be >= 0, got {self.inversion_offset}")
        for key in ("shared_score_scale", "shared_score_shift"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key} must be a finite number, got {getattr(self, key)}")


SPEC = StrategySpec(
    name=NAME,
    summary="StyleAligned: AdaIN of Q/K against a reference row, shared attention to its K/V",
    params=StyleAlignedParams,
)


def adain(call: AttentionCall, x: torch.Tensor, role: str) -> torch.Tensor:
    """Each row's ``x`` [B, h, N, d] with the token statistics of its ``role`` partner (fp32 or finer).

    A single token has no unbiased variance (their code gives NaN there): such sites keep ``x``.
    """
    import torch  # not at module level: listing strategies needs no torch

    if x.shape[-2] < 2:
        return x
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    mean, std = x.mean(dim=-2, keepdim=True), (x.var(dim=-2, keepdim=True) + EPS).sqrt()
    return (x - mean) / std * call.take(std, role) + call.take(mean, role)


@dataclass(eq=False)
class AdainOp(ProjectionOp):
    """Q, K and/or V <- AdaIN against the reference row of the same branch."""

    queries: bool = field(default=True, kw_only=True)
    keys: bool = field(default=True, kw_only=True)
    values: bool = field(default=False, kw_only=True)

    def project(self, call: AttentionCall) -> None:
        if self.queries:
            call.set_query(adain(call, call.query, self.strategy))
        call.set_own_kv(adain(call, call.key, self.strategy) if self.keys else None,
                        adain(call, call.value, self.strategy) if self.values else None)


@dataclass(eq=False)
class SharedKeysOp(KeyValueOp):
    """Appends the reference row's own keys (x ``scale`` except on the reference rows) and values."""

    scale: float = field(default=1.0, kw_only=True)
    shift: float = field(default=0.0, kw_only=True)
    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def extend(self, call: AttentionCall) -> None:
        role = self.strategy
        key, value = call.take(call.own_key, role), call.take(call.own_value, role)
        if self.scale != 1.0:
            key = key * call.memo((NAME, role, self.scale, key.dtype), lambda: self._factor(call, key))
        bias = None if self.shift == 0.0 else call.query.new_full((1, 1, 1, key.shape[-2]), self.shift)
        call.append_keys(key, value, bias)

    def _factor(self, call: AttentionCall, key: torch.Tensor) -> torch.Tensor:
        factor = key.new_full((key.shape[0], 1, 1, 1), self.scale)
        factor[call.rows_of(self.strategy)] = 1.0
        return factor


@dataclass(eq=False)
class SharedGroupNorm(FeatureOp):
    """Their ``share_group_norm``: each GroupNorm normalizes a row's features concatenated along the
    height with its reference row's, then keeps the row's own part (``x`` [B, C, H, W])."""

    def apply(self, call: FeatureCall) -> torch.Tensor:
        import torch
        import torch.nn.functional as F

        x, norm = call.args[0], call.module
        joined = torch.cat([x, call.take(x, self.strategy)], dim=-2)
        return F.group_norm(joined, norm.num_groups, norm.weight, norm.bias, norm.eps)[..., : x.shape[-2], :]


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: StyleAlignedParams, sites: SiteTable):
    if spec.name != NAME:
        return None
    if params.reference_image:  # their transfer notebook: the reference follows its inversion
        image = open_image(params.reference_image, f"strategies.{instance}.reference_image")
        row = RowSpec(role=instance, prompt=params.reference_prompt, driver="inverted", image=image, per_image=False,
                      inversion_guidance=params.inversion_guidance, inversion_offset=params.inversion_offset,
                      output=params.keep_reference)
    else:
        row = RowSpec(role=instance, prompt=params.reference_prompt, driver="free", per_image=False,
                      noise_seed=params.reference_seed, output=params.keep_reference)
    ops: list = [RowOp(instance, row=row)]
    if params.share_group_norm:  # every GroupNorm of the UNet, as their register_shared_norm
        ops.append(SharedGroupNorm(instance, modules="GroupNorm"))
    adain_any = params.adain_queries or params.adain_keys or params.adain_values
    for site in self_attention_sites(params.sites, sites, f"strategies.{instance}"):
        if adain_any:
            ops.append(AdainOp(instance, site=site, queries=params.adain_queries, keys=params.adain_keys,
                               values=params.adain_values))
        ops.append(SharedKeysOp(instance, site=site, scale=params.shared_score_scale,
                                shift=params.shared_score_shift))
    return ops
