"""Processor adapters: how attnctl's attention core runs inside each kind of attention processor.

A site's processor may be diffusers' default, a fused or sliced variant, IP-Adapter's,
PAG's, or a user's own. Where a strategy acts, attnctl must compute the site's attention
with its ops *and* keep everything else the processor does (IP-Adapter's image branch,
PAG's perturbed rows, a user's output scaling). An adapter says how:

- ``MIRROR``: the processor computes plain attention (diffusers' ``AttnProcessor2_0``,
  ``AttnProcessor``, ``SlicedAttnProcessor``, ``XFormersAttnProcessor``): attnctl runs its
  own mirror of ``AttnProcessor2_0`` with the ops applied. Same function, fused kernels.
- ``SdpaAdapter()``: the processor's own code runs, and its first call of
  ``torch.nn.functional.scaled_dot_product_attention`` is computed by attnctl's core instead
  (IP-Adapter: the text attention, then its image branch as written; a fused-projection
  processor: its projections, then the core). ``skip_branches`` names batch rows the
  processor leaves out of that call (PAG's perturbed rows), ``guidance_mirror`` makes the
  guidance pass (conditional rows only) use ``MIRROR`` for processors that assume the
  pipeline's full batch.

Processors are matched by exact class (a subclass may change the computation). Unknown
processors are never run with ops silently dropped: ``attnctl.attach`` refuses a site
where a strategy acts and no adapter is known, naming the site, the class and the ways out
(``attach(..., adapters={MyProcessor: attnctl.SdpaAdapter()})`` or the
``attnctl_add_processor_adapters`` hook of a plugin).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from attnctl.attention import compute, finish_attention, project_attention
from attnctl.call import AttentionCall
from attnctl.errors import UnsupportedProcessorError
from attnctl.joint import joint_compute
from attnctl.ops import ActiveOps
from attnctl.sites import Site

if TYPE_CHECKING:
    from attnctl.interfaces import RunView


@dataclass(frozen=True)
class CoreCall:
    """What an adapter gets from the controlled processor: where, in which run, with which ops."""

    site: Site
    state: RunView
    ops: ActiveOps

    def compute(self, query, key, value, bias, scale: float | None = None, rows=None) -> torch.Tensor:
        """The site's attention [B, h, Nq, d_v] with the ops applied (``rows``: default the state's)."""
        default = scale is None
        scale = query.shape[-1] ** -0.5 if default else scale
        if self.site.is_joint:
            return joint_compute(self.site, self.state, self.ops, query, key, value, bias, scale, default, rows)
        call = AttentionCall(self.site, self.state, query, key, value, bias, scale, rows=rows, scale_is_default=default)
        return compute(call, self.ops)


class ProcessorAdapter(Protocol):
    """Runs ``original`` with attnctl's core for ``core.site`` inserted."""

    guidance_mirror: bool

    def run(self, core: CoreCall, original: Any, attn: Any, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Return what ``original(attn, hidden_states, *args, **kwargs)`` returns, with the site's ops applied."""
        ...


class MirrorAdapter:
    """attnctl's own copy of ``AttnProcessor2_0`` with the core inserted (for plain-attention processors)."""

    guidance_mirror = False

    def run(self, core, original, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
            *args, **kwargs):
        if encoder_hidden_states is not None and not isinstance(encoder_hidden_states, torch.Tensor):
            raise UnsupportedProcessorError(
                f"{core.site.key} ({core.site.name}): {type(original).__name__} received encoder_hidden_states of "
                f"type {type(encoder_hidden_states).__name__}, which plain attention cannot use; this site needs "
                "the adapter of the processor that expects it (e.g. IP-Adapter's)"
            )
        p = project_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return finish_attention(attn, p, core.compute(p.query, p.key, p.value, p.mask))

    def __repr__(self) -> str:
        return "MIRROR"


MIRROR = MirrorAdapter()
_SDPA = F.scaled_dot_product_attention


@dataclass(frozen=True)
class SdpaAdapter:
    """Runs the processor's own code; its first ``F.scaled_dot_product_attention`` call is attnctl's core.

    Args:
        skip_branches: branches whose rows the processor leaves out of that call, in the
            batch order it keeps (PAG: ``("perturbed",)``).
        guidance_mirror: in attnctl's guidance pass, use ``MIRROR`` instead (for processors
            that split the batch by the pipeline's layout and would fail on a subset).
    """

    skip_branches: tuple[str, ...] = ()
    guidance_mirror: bool = False

    def run(self, core, original, attn, hidden_states, *args, **kwargs):
        _check_backend(core, original)
        rows = None
        if self.skip_branches:
            layout = core.state.layout
            rows = tuple(r for r in core.state.rows if layout.branches[r] not in self.skip_branches)
        with _CoreAtFirstSdpa(core, rows) as mode:
            out = original(attn, hidden_states, *args, **kwargs)
        if mode.calls == 0:
            raise UnsupportedProcessorError(
                f"{core.site.key} ({core.site.name}): {type(original).__name__} never called "
                "torch.nn.functional.scaled_dot_product_attention, so SdpaAdapter could not insert attnctl's "
                "core there (an attention backend other than diffusers' 'native' one, set with "
                "set_attention_backend / attention_backend() / DIFFUSERS_ATTN_BACKEND, computes attention "
                "without it); use the native backend at the sites where strategies act, give that processor "
                "class an adapter that fits it, or leave the site out of the strategies' selectors"
            )
        return out


def _check_backend(core: CoreCall, original: Any) -> None:
    """Refuse, by name, what diffusers' attention dispatch would do instead of one plain SDPA call."""
    if getattr(original, "_parallel_config", None) is not None:
        raise UnsupportedProcessorError(
            f"{core.site.key} ({core.site.name}): context parallelism splits this site's sequence across devices "
            "(enable_parallelism); attnctl's ops need the whole attention in one call. Disable it while strategies act"
        )
    backend = getattr(original, "_attention_backend", None)
    name = None if backend is None else str(getattr(backend, "value", backend))  # an enum member or its value
    if name is not None and name != "native":
        raise UnsupportedProcessorError(
            f"{core.site.key} ({core.site.name}): its processor uses the attention backend "
            f"{name!r}, which does not call scaled_dot_product_attention, where "
            "attnctl computes a site's attention; set the 'native' backend on the sites where strategies act "
            "(idle sites may keep any backend)"
        )


class _CoreAtFirstSdpa(TorchFunctionMode):
    """Within the block, the first SDPA call is computed by ``core``; everything else runs as is."""

    def __init__(self, core: CoreCall, rows):
        super().__init__()
        self.core, self.rows, self.calls = core, rows, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _SDPA:
            return func(*args, **kwargs)
        self.calls += 1
        if self.calls > 1:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")
        bound = {**dict(zip(names, args)), **kwargs}
        if bound.get("dropout_p", 0.0) or bound.get("is_causal", False) or bound.get("enable_gqa", False):
            raise UnsupportedProcessorError(
                f"{self.core.site.key}: the processor calls scaled_dot_product_attention with dropout, "
                "is_causal or enable_gqa; attnctl's core computes plain (non-causal, no dropout) attention only"
            )
        query = bound["query"]
        if self.rows is not None and query.shape[0] != len(self.rows):
            raise UnsupportedProcessorError(
                f"{self.core.site.key}: the processor's attention has {query.shape[0]} rows, but the run layout "
                f"says {len(self.rows)} rows reach it; is the BatchLayout right for this pipeline?"
            )
        return self.core.compute(query, bound["key"], bound["value"], bound.get("attn_mask"), bound.get("scale"),
                                 rows=self.rows)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_DIFFUSERS = "diffusers.models.attention_processor."
_PAG = SdpaAdapter(skip_branches=("perturbed",), guidance_mirror=True)
#: diffusers' processors attnctl knows, by qualified class name (exact class match)
BUILTIN_ADAPTERS: Mapping[str, ProcessorAdapter] = {
    _DIFFUSERS + "AttnProcessor2_0": MIRROR,
    _DIFFUSERS + "AttnProcessor": MIRROR,
    _DIFFUSERS + "SlicedAttnProcessor": MIRROR,
    _DIFFUSERS + "XFormersAttnProcessor": MIRROR,
    _DIFFUSERS + "FusedAttnProcessor2_0": SdpaAdapter(),
    _DIFFUSERS + "IPAdapterAttnProcessor2_0": SdpaAdapter(),
    _DIFFUSERS + "PAGIdentitySelfAttnProcessor2_0": _PAG,
    _DIFFUSERS + "PAGCFGIdentitySelfAttnProcessor2_0": _PAG,
    # transformers (attnctl.backbones): the joint attention is the processor's first SDPA call
    _DIFFUSERS + "JointAttnProcessor2_0": SdpaAdapter(),
    _DIFFUSERS + "FusedJointAttnProcessor2_0": SdpaAdapter(),
    "diffusers.models.transformers.transformer_flux.FluxAttnProcessor": SdpaAdapter(),
}


class AdapterRegistry:
    """Adapters by processor class: the built-ins, then plugins', then the caller's (later ones win)."""

    def __init__(self, *tables: Mapping[type | str, ProcessorAdapter]):
        self._by_name: dict[str, ProcessorAdapter] = dict(BUILTIN_ADAPTERS)
        for table in tables:
            for cls, adapter in (table or {}).items():
                if not callable(getattr(adapter, "run", None)):
                    raise UnsupportedProcessorError(
                        f"the adapter given for {cls} has no run(core, original, attn, hidden_states, ...) method"
                    )
                self._by_name[cls if isinstance(cls, str) else _qualified(cls)] = adapter

    def find(self, processor: Any) -> ProcessorAdapter | None:
        """The adapter for ``processor``'s exact class, or None."""
        return self._by_name.get(_qualified(type(processor)))

    def refusal(self, site: Site, processor: Any, instances: list[str]) -> UnsupportedProcessorError:
        """The error for a site where ``instances`` act and ``processor`` has no adapter."""
        name = type(processor).__name__
        return UnsupportedProcessorError(
            f"{site.key} ({site.name}) has the attention processor {name}, which attnctl has no adapter for, "
            f"and {', '.join(f'strategies.{i}' for i in instances)} act(s) there. Ways out: if {name} computes its "
            f"attention with one torch.nn.functional.scaled_dot_product_attention call, attach with "
            f"adapters={{{name}: attnctl.SdpaAdapter()}}; or leave this site out of the strategies' `sites`; "
            "or restore diffusers' default processor (unet.set_default_attn_processor()) before attaching. "
            "See docs/compatibility.md."
        )
