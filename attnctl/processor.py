"""The controlled processor that wraps each site's original attention processor."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from attnctl.adapters import MIRROR, CoreCall, ProcessorAdapter
from attnctl.ops import NO_OPS

if TYPE_CHECKING:
    from attnctl.run_state import RunState
    from attnctl.sites import Site


class RunSlot:
    """Where a controller publishes its current run state to its processors.

    ``state`` is the run in progress (None between runs); ``attached`` turns False on detach,
    so wrappers that outlive their controller (diffusers can put them back) are known stale.
    """

    __slots__ = ("state", "attached")

    def __init__(self) -> None:
        self.state: RunState | None = None
        self.attached = True


class ControlledProcessor:
    """Wraps (never replaces) a site's original processor.

    With no op active at this site in the current step, the call goes to the original
    processor with exactly the arguments it would have had, so an idle attach is bit for
    bit the stock pipeline: the wrapper presents the original's call signature, because
    diffusers hands a processor only the ``cross_attention_kwargs`` its signature names.
    With ops active, the site's adapter runs the original with attnctl's core inserted.
    The idle hot path is one dict lookup.
    """

    def __new__(cls, *args, **kwargs):
        # diffusers rebuilds processors as ``type(current)()`` (load_ip_adapter does, for the
        # sites it leaves without image branch); without arguments, give it the default
        # processor, which attnctl wraps again at the next run
        if not args and not kwargs:
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()
        return super().__new__(cls)

    def __init__(self, slot: RunSlot, site: Site, original: Any, adapter: ProcessorAdapter | None):
        self.slot = slot
        self.site = site
        self.original = original
        self.adapter = adapter
        # processors that split the batch by the pipeline's layout cannot run on the guidance pass's subset
        self._guidance_mirror = bool(adapter is not None and adapter.guidance_mirror)
        _present_signature(self, original)

    def __call__(self, attn, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self.slot.state
        if state is not None:
            ops = state.active.get(self.site.name)
            if ops is not None:
                state.sites_run.add(self.site.name)
                adapter = MIRROR if self._guidance_mirror and state.in_guidance else self.adapter
                return adapter.run(CoreCall(self.site, state, ops), self.original, attn, hidden_states, *args, **kwargs)
            if self._guidance_mirror and state.in_guidance:
                return MIRROR.run(CoreCall(self.site, state, NO_OPS), self.original, attn, hidden_states, *args, **kwargs)
        return self.original(attn, hidden_states, *args, **kwargs)

    def __repr__(self) -> str:
        return f"ControlledProcessor({self.site.key}, original={type(self.original).__name__})"


class ControlledModuleProcessor(torch.nn.Module, ControlledProcessor):
    """Variant for original processors that are ``nn.Module``s (e.g. with adapter weights).

    The original stays registered as a child module, so ``.to()``, ``parameters()`` and
    ``state_dict()`` still see its weights (under ``processor.original.``).
    """

    def __init__(self, slot: RunSlot, site: Site, original: torch.nn.Module, adapter):
        torch.nn.Module.__init__(self)
        ControlledProcessor.__init__(self, slot, site, original, adapter)

    def forward(self, attn, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return ControlledProcessor.__call__(self, attn, hidden_states, *args, **kwargs)

    __call__ = torch.nn.Module.__call__


def _present_signature(wrapper: ControlledProcessor, original: Any) -> None:
    """Make ``inspect.signature(wrapper.__call__)`` equal the original's.

    diffusers' ``Attention.forward`` filters ``cross_attention_kwargs`` by the parameter
    names of ``processor.__call__``; an instance attribute that carries the original's
    signature makes the wrapper receive exactly what the original would. Calls still go
    through the class's ``__call__``.
    """
    try:
        signature = inspect.signature(original.__call__)
    except (TypeError, ValueError):  # a builtin callable without a signature: nothing to present
        return
    cls_call = type(wrapper).__call__

    def presented(*args, **kwargs):
        return cls_call(wrapper, *args, **kwargs)

    presented.__signature__ = signature  # type: ignore[attr-defined]
    object.__setattr__(wrapper, "__call__", presented)


def make_processor(slot: RunSlot, site: Site, original: Any, adapter: ProcessorAdapter | None) -> ControlledProcessor:
    """The right wrapper class for ``original``."""
    if isinstance(original, torch.nn.Module):
        return ControlledModuleProcessor(slot, site, original, adapter)
    return ControlledProcessor(slot, site, original, adapter)


def innermost(processor: Any) -> Any:
    """The processor under any number of attnctl wrappers."""
    while isinstance(processor, ControlledProcessor):
        processor = processor.original
    return processor
