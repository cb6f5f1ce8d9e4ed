"""``kv_bank``: inject a bank of extra keys/values into self-attention (HarmonPaint's MAKVS).

The mechanism, for a bank ``(K~, V~)`` and strength ``lambda`` (``scale``)::

    out = softmax(Q [K ; lambda K~]^T / sqrt(d)) [V ; V~]                 (Eq. 11-12)

A *source* says what the bank is. ``masked_mean`` is the paper's Eq. 10, per batch row
and head, with ``M`` the binary mask at the site's grid (1 = inpaint)::

    K_bar = mean of K(i) over unmasked i (M(i) = 0);  V_bar likewise
    K~(i) = K(i) if M(i) = 0 else K_bar;               V~(i) likewise    (Eq. 10)

Fast path (exact): the n_masked identical bank entries ``(lambda K_bar, V_bar)`` contribute
``n_masked * exp(q . lambda K_bar / sqrt(d)) V_bar`` to the softmax sums, which is one key
with additive bias ``log(n_masked)``. The unmasked entries are the row's own unmasked keys,
gathered. Rows of a batch have different unmasked counts, so every row gathers
``n_max = max_r n_unmasked(r)`` entries (stable argsort puts the unmasked tokens first) and
entries past its own count get bias ``-inf`` (weight exactly 0). Keys per row:
``HW + n_max + 1`` instead of ``2 HW``. A row without unmasked tokens at this grid has
no mean: its bank is all ``-inf`` (no injection, exactly), and the run warns once; if no
row of the call has any, nothing is appended.

``row`` (StyleAligned/MasaCtrl-style) is a second source through the same mechanism: every
row also attends to the own keys/values of ``source_image`` in the same CFG branch
(``lambda``-scaled keys); the reference row itself is left unchanged (its bank is ``-inf``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, NamedTuple

import attnctl
from attnctl.errors import ConfigError, InputError, did_you_mean
from attnctl.ops import KeyValueOp
from attnctl.params import StrategySpec
from attnctl.sites import SiteTable
from strategies._attention_sites import grid_tokens, self_attention_sites
from strategies._rotary import rotate, unrotate

if TYPE_CHECKING:
    import torch

    from attnctl.call import AttentionCall

# torch is imported inside the functions that compute: discovering and validating strategies
# (``attnctl strategies``, recipe checks) then runs without loading it

NAME = "kv_bank"


class Bank(NamedTuple):
    """Bank entries of one call: unscaled ``key``/``value`` [B, h, n, d], additive ``bias`` [B, 1, 1, n] (fp32)."""

    key: torch.Tensor
    value: torch.Tensor
    bias: torch.Tensor


class _MaskedMeanPlan(NamedTuple):
    """What Eq. 10 needs from the masks of one grid and set of rows (computed once per run)."""

    index: torch.Tensor | None  # [B, n_max] positions of unmasked tokens, unmasked first
    weights: torch.Tensor  # [B, 1, 1, HW] 1/n_unmasked on unmasked tokens: the mean as a matmul
    bias: torch.Tensor  # [B, 1, 1, n_max + 1]: 0 / -inf (padding) for gathered keys, log(n_masked) for the mean key
    any_empty: bool  # some row has no unmasked token
    all_empty: bool


def _mean_weights(masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked tokens per row ``[B]``, and ``[B, 1, 1, HW]`` weights 1/n_unmasked on them: the mean as a matmul."""
    n_keep = masked.shape[-1] - masked.sum(-1)
    return n_keep, ((1.0 - masked) / n_keep.clamp(min=1)[:, None])[:, None, None, :]


def _masked_mean_plan(masked: torch.Tensor) -> _MaskedMeanPlan:
    import torch

    hw = masked.shape[-1]
    n_keep, weights = _mean_weights(masked)
    any_empty, all_empty = bool((n_keep == 0).any()), bool((n_keep == 0).all())
    # K~(i) = K(i) for unmasked i: gather them (unmasked first), padded to the largest count
    n_max = int(n_keep.max())
    order = torch.argsort(masked, dim=-1, stable=True)[:, :n_max]
    valid = torch.arange(n_max, device=masked.device)[None] < n_keep[:, None]
    kept_bias = torch.zeros(masked.shape[0], n_max, device=masked.device).masked_fill(~valid, -math.inf)
    # K~(i) = K_bar for masked i: n_masked copies of one key = one key with bias log(n_masked)
    bar_bias = torch.log(hw - n_keep).masked_fill(n_keep == 0, -math.inf)[:, None]  # log 0 = -inf: no masked token
    bias = torch.cat([kept_bias, bar_bias], dim=-1)[:, None, None, :]
    return _MaskedMeanPlan(order, weights, bias, any_empty, all_empty)


def _static_masked_mean_bank(key: torch.Tensor, value: torch.Tensor, masked: torch.Tensor) -> Bank:
    """Eq. 10 with static shapes, for ``torch.compile``: no host reads of mask counts.

    All HW own keys are appended, masked ones with bias -inf (weight exactly 0), plus the
    mean key with bias log(n_masked): HW + 1 bank keys, the same attention as the compact
    form. A row without unmasked tokens gets -inf on its whole bank (no injection).
    """
    import torch

    hw = masked.shape[-1]
    n_keep, weights = _mean_weights(masked)
    k_bar = torch.matmul(weights, key.float()).to(key.dtype)
    v_bar = torch.matmul(weights, value.float()).to(value.dtype)
    own_bias = torch.zeros_like(masked).masked_fill(masked > 0, -math.inf)
    bar_bias = torch.where(n_keep > 0, torch.log(hw - n_keep), torch.full_like(n_keep, -math.inf))[:, None]
    bias = torch.cat([own_bias, bar_bias], dim=-1)[:, None, None, :]
    return Bank(torch.cat([key, k_bar], dim=2), torch.cat([value, v_bar], dim=2), bias)


def masked_mean_bank(call: AttentionCall, op: KvBankOp) -> Bank | None:
    """Eq. 10 in compact form: gathered unmasked keys plus one mean key with bias log(n_masked)."""
    import torch

    hw = grid_tokens(call)
    if torch.compiler.is_compiling():  # data-dependent shapes would break the graph
        return _static_masked_mean_bank(call.key[..., :hw, :], call.value[..., :hw, :], call.mask())
    plan = call.memo("kv_bank", lambda: _masked_mean_plan(call.mask()))
    if plan.any_empty:
        _warn_once(call, op, f"{call.site.key}: the mask covers every token at this {call.grid} grid "
                   "for some image, so the unmasked mean is undefined; kv_bank skips injection there")
        if plan.all_empty:
            return None
    key, value = call.key[..., :hw, :], call.value[..., :hw, :]
    b, h, _, d = key.shape
    index = plan.index[:, None, :, None].expand(b, h, plan.index.shape[-1], d)
    k_bar = torch.matmul(plan.weights, key.float()).to(key.dtype)  # [B, h, 1, d], mean in fp32
    v_bar = torch.matmul(plan.weights, value.float()).to(value.dtype)
    return Bank(
        key=torch.cat([key.gather(2, index), k_bar], dim=2),
        value=torch.cat([value.gather(2, index), v_bar], dim=2),
        bias=plan.bias,
    )


def positions_masked_mean_bank(call: AttentionCall, op: KvBankOp) -> Bank | None:
    """Eq. 10 where keys carry rotary positions (FLUX): the mean of the unmasked keys rotated back to
    position 0, rotated again to each masked token's position; HW bank keys, no shared key.

    Without a rotary embedding (UNets, SD3) this is Eq. 10 as ``masked_mean_bank`` computes it.
    """
    import torch

    rotary = call.image_rotary()
    if rotary is None:
        return masked_mean_bank(call, op)
    hw = grid_tokens(call)
    masked = call.mask()
    n_keep, weights = _mean_weights(masked)
    if bool((n_keep == 0).any()):
        _warn_once(call, op, f"{call.site.key}: the mask covers every token at this {call.grid} grid "
                   "for some image, so the unmasked mean is undefined; kv_bank skips injection there")
    key, value = call.key[..., :hw, :], call.value[..., :hw, :]
    cos, sin = (t.to(key.device) for t in rotary)
    plain = unrotate(key, cos, sin)  # at position 0, fp32 or wider
    k_bar = torch.matmul(weights.to(plain.dtype), plain)  # [B, h, 1, d]
    v_bar = torch.matmul(weights.to(plain.dtype), value.to(plain.dtype))
    at_masked = (masked > 0)[:, None, :, None]
    k_tilde = torch.where(at_masked, rotate(k_bar.expand_as(key), cos, sin), key.to(plain.dtype)).to(key.dtype)
    v_tilde = torch.where(at_masked, v_bar.expand_as(value), value.to(plain.dtype)).to(value.dtype)
    bias = torch.zeros_like(masked).masked_fill((n_keep == 0)[:, None], -math.inf)  # no mean: no injection
    return Bank(k_tilde, v_tilde, bias[:, None, None, :])


def reference_row_bank(call: AttentionCall, op: KvBankOp) -> Bank:
    """The own keys/values of image ``source_image`` in the same CFG branch as each row."""
    import torch

    hw = grid_tokens(call)
    layout = call.layout
    refs = []
    for r in range(len(layout)):
        hits = [j for j in range(len(layout))
                if layout.images[j] == op.source_image and layout.branches[j] == layout.branches[r]]
        if not hits:
            raise InputError(
                f"strategies.{op.strategy}.source_image={op.source_image}: that image has no "
                f"{layout.branches[r]} row in this UNet call (images: {sorted(set(layout.images))}); pick one of them"
            )
        refs.append(hits[0])
    index = torch.tensor(refs, device=call.key.device)
    own = index == torch.arange(len(refs), device=index.device)  # the reference keeps its own attention
    bias = torch.zeros(len(refs), hw, device=call.key.device).masked_fill(own[:, None], -math.inf)
    return Bank(call.key[:, :, :hw].index_select(0, index), call.value[:, :, :hw].index_select(0, index),
                bias[:, None, None, :])


SOURCES: dict[str, Callable[[AttentionCall, "KvBankOp"], Bank | None]] = {
    "masked_mean": masked_mean_bank,
    "row": reference_row_bank,
}
#: how ``masked_mean`` treats keys rotated by position (FLUX): mean of the rotated keys, or at positions
ROPE_MODES = ("rotated", "positions")


def _warn_once(call: AttentionCall, op: KvBankOp, message: str) -> None:
    """One warning per run and instance (flag kept in the run's scratch)."""
    scratch = call.state.scratch_for(op.strategy)
    if not scratch.get("warned_no_unmasked"):
        scratch["warned_no_unmasked"] = True
        warnings.warn(f"strategies.{op.strategy}: {message}", UserWarning, stacklevel=3)


@dataclass(frozen=True)
class KvBankParams:
    """Parameters of ``kv_bank``."""

    sites: str = field(default="self[-8:]", metadata={"help": "self-attention sites to act on (selector)"})
    scale: float = field(default=1.4, metadata={"help": "lambda: scale of the bank keys (Eq. 11), > 0"})
    source: str = field(default="masked_mean", metadata={"help": f"bank source: {', '.join(SOURCES)}"})
    source_image: int = field(default=0, metadata={"help": "source=row: index of the reference image"})
    rope: str = field(default="rotated", metadata={
        "help": "masked_mean on keys with rotary positions (FLUX): 'rotated' (the mean of the rotated keys, one "
                "bank key; cheap) or 'positions' (the mean rotated back to position 0, then to each masked "
                "token's position; HW bank keys); the same on models without rotary positions"})

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ConfigError(f"scale (lambda) must be a finite number > 0, got {self.scale}")
        if self.source not in SOURCES:
            raise ConfigError(
                f"unknown source '{self.source}'{did_you_mean(self.source, SOURCES)}; choose one of {', '.join(SOURCES)}"
            )
        if self.source_image < 0:
            raise ConfigError(f"source_image must be an image index >= 0, got {self.source_image}")
        if self.rope not in ROPE_MODES:
            raise ConfigError(f"rope: unknown '{self.rope}'; choose one of {', '.join(ROPE_MODES)}")


SPEC = StrategySpec(
    name=NAME,
    summary="key/value bank injection: softmax(Q[K; lambda K~]^T) [V; V~] (HarmonPaint MAKVS, reference rows)",
    params=KvBankParams,
)


@dataclass(eq=False)
class KvBankOp(KeyValueOp):
    """Appends ``(lambda K~, V~)`` from the configured source to the call's keys/values."""

    scale: float = field(default=1.4, kw_only=True)
    source: str = field(default="masked_mean", kw_only=True)
    source_image: int = field(default=0, kw_only=True)
    rope: str = field(default="rotated", kw_only=True)

    #: on a joint site the bank joins the image queries' keys (text queries never see it); on a
    #: transformer with rotary embedding (FLUX) the keys are rotated by position before attention,
    #: so the masked mean is a mean of rotated keys
    joint_sites: ClassVar[bool] = True

    def needs_rotary(self) -> bool:
        return self.source == "masked_mean" and self.rope == "positions"

    def extend(self, call: AttentionCall) -> None:
        source = positions_masked_mean_bank if self.needs_rotary() else SOURCES[self.source]
        bank = source(call, self)
        if bank is not None:
            call.append_keys(self.scale * bank.key, bank.value, bank.bias)


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: KvBankParams, sites: SiteTable):
    if spec.name != NAME:
        return None
    where = f"strategies.{instance}"
    return [
        KvBankOp(instance, site=site, scale=params.scale, source=params.source, source_image=params.source_image,
                 rope=params.rope)
        for site in self_attention_sites(params.sites, sites, where)
    ]


@attnctl.hookimpl
def attnctl_run_start(state, plan) -> None:
    """Fail at run start, not mid-run, when a ``row`` source names an image the run lacks."""
    for instance, (spec, params) in plan.instances.items():
        if spec.name == NAME and params.source == "row" and params.source_image >= state.layout.num_images:
            raise InputError(
                f"strategies.{instance}.source_image={params.source_image}, but this run has "
                f"{state.layout.num_images} image(s); use an index below {state.layout.num_images}"
            )
