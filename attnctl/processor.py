"""The controlled processor that wraps each site's original attention processor."""

from __future__ import annotations

import copy
import inspect
from typing import TYPE_CHECKING, Any

import torch

from attnctl.adapters import MIRROR, CoreCall, ProcessorAdapter
from attnctl.errors import AttnctlError
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

    To the rest of diffusers the wrapper looks like the original: its ``__class__`` is the
    original's (diffusers checks processors with ``isinstance`` and rebuilds them as
    ``type(p)()``: ``set_ip_adapter_scale``, ``load_ip_adapter``, ``set_default_attn_processor``),
    and attributes it does not own are read from and written to the original.
    """

    def __init__(self, slot: RunSlot, site: Site, original: Any, adapter: ProcessorAdapter | None):
        self.slot = slot
        self.site = site
        self.original = original
        self.adapter = adapter
        # processors that split the batch by the pipeline's layout cannot run on the guidance pass's subset
        self._guidance_mirror = bool(adapter is not None and adapter.guidance_mirror)

    def __call__(self, attn, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self.slot.state
        if state is not None:
            ops = state.active.get(self.site.name)
            if ops is not None:
                state.sites_run[self.site.name] = True
                adapter = MIRROR if self._guidance_mirror and state.in_guidance else self.adapter
                return adapter.run(CoreCall(self.site, state, ops), self.original, attn, hidden_states, *args, **kwargs)
            if self._guidance_mirror and state.in_guidance:
                return MIRROR.run(CoreCall(self.site, state, NO_OPS), self.original, attn, hidden_states, *args, **kwargs)
        return self.original(attn, hidden_states, *args, **kwargs)

    # ------------------------------------------------------------------ transparency
    @property
    def __class__(self):  # noqa: D105 - the original's class, see the class docstring
        original = _original_of(self)
        return type(self) if original is None else type(original)

    def __getattr__(self, name: str) -> Any:
        original = _original_of(self)
        if original is None:
            raise AttributeError(name)
        return getattr(original, name)

    def __setattr__(self, name: str, value: Any) -> None:
        original = _original_of(self)
        if original is None or name in _OWN or name in self.__dict__:
            object.__setattr__(self, name, value)
        else:
            setattr(original, name, value)

    def __deepcopy__(self, memo: dict) -> Any:
        if self.slot.attached:
            raise AttnctlError(
                f"{self.site.name}: cannot copy a model while attnctl is attached to it; call "
                "controller.detach() first, copy, then attach to each copy"
            )
        return copy.deepcopy(self.original, memo)  # a stale wrapper copies as what it wraps

    def __repr__(self) -> str:
        return f"ControlledProcessor({self.site.key}, original={type(self.original).__name__})"


#: attributes the wrapper keeps for itself; every other attribute is the original's
_OWN = frozenset({"slot", "site", "original", "adapter", "_guidance_mirror", "__call__"})


def _original_of(wrapper: ControlledProcessor) -> Any:
    """The wrapped processor, or None while the wrapper is being built (read without attribute hooks)."""
    state = wrapper.__dict__
    if "original" in state:
        return state["original"]
    modules = state.get("_modules")
    return modules.get("original") if modules else None


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

    def __getattr__(self, name: str) -> Any:
        try:  # parameters, buffers and submodules of the wrapper itself
            return torch.nn.Module.__getattr__(self, name)
        except AttributeError:
            return ControlledProcessor.__getattr__(self, name)

    __call__ = torch.nn.Module.__call__


#: (wrapper base, original class) -> the wrapper class that presents that class's call signature
_PRESENTING: dict[tuple[type, type], type] = {}


def _presenting_class(base: type, original: Any) -> type:
    """A subclass of ``base`` whose ``__call__`` carries the original's call signature.

    diffusers' ``Attention.forward`` filters ``cross_attention_kwargs`` by the parameter
    names of ``inspect.signature(processor.__call__)``, so the wrapper must present the
    original's. It does so with a class-level ``__call__`` (one class per original class),
    not an instance attribute: ``torch.compile`` traces a class's call, and an attached but
    idle UNet compiles to one graph. The function has a default (``hidden_states=None``):
    dynamo guards the length of ``__defaults__``.
    """
    key = (base, type(original))
    if key not in _PRESENTING:
        try:
            bound = inspect.signature(original.__call__)
        except (TypeError, ValueError):  # a builtin callable without a signature: present the base's
            bound = None
        call = base.__call__

        def __call__(self, attn, hidden_states=None, *args, **kwargs):
            return call(self, attn, hidden_states, *args, **kwargs)

        if bound is not None:
            this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
            __call__.__signature__ = bound.replace(parameters=[this, *bound.parameters.values()])  # type: ignore[attr-defined]
        _PRESENTING[key] = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                                         "__qualname__": base.__qualname__})
    return _PRESENTING[key]


def make_processor(slot: RunSlot, site: Site, original: Any, adapter: ProcessorAdapter | None) -> ControlledProcessor:
    """The right wrapper class for ``original``, presenting its call signature."""
    base = ControlledModuleProcessor if isinstance(original, torch.nn.Module) else ControlledProcessor
    return _presenting_class(base, original)(slot, site, original, adapter)


def innermost(processor: Any) -> Any:
    """The processor under any number of attnctl wrappers."""
    while isinstance(processor, ControlledProcessor):
        processor = processor.original
    return processor
