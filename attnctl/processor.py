"""The controlled processor that wraps each site's original attention processor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from attnctl.attention import controlled_attention
from attnctl.sites import Site

if TYPE_CHECKING:
    from attnctl.controller import Controller


class ControlledProcessor:
    """Wraps (never replaces) a site's original processor.

    With no op active at this site in the current step, the call goes to the original
    processor with exactly the arguments it would have had, so an idle attach is bit
    for bit the stock pipeline. The hot path is one dict lookup.
    """

    def __init__(self, controller: Controller, site: Site, original: Any):
        self.controller = controller
        self.site = site
        self.original = original

    def __call__(self, attn, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self.controller.state
        if state is not None:
            ops = state.active.get(self.site.name)
            if ops is not None:
                return controlled_attention(attn, self.site, ops, state, hidden_states, *args, **kwargs)
        return self.original(attn, hidden_states, *args, **kwargs)

    def __repr__(self) -> str:
        return f"ControlledProcessor({self.site.key}, original={type(self.original).__name__})"


class ControlledModuleProcessor(torch.nn.Module, ControlledProcessor):
    """Variant for original processors that are ``nn.Module``s (e.g. with adapter weights).

    The original stays registered as a child module, so ``.to()``, ``parameters()`` and
    ``state_dict()`` still see its weights (under ``processor.original.``).
    """

    def __init__(self, controller: Controller, site: Site, original: torch.nn.Module):
        torch.nn.Module.__init__(self)
        ControlledProcessor.__init__(self, controller, site, original)

    def forward(self, attn, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return ControlledProcessor.__call__(self, attn, hidden_states, *args, **kwargs)

    __call__ = torch.nn.Module.__call__


def make_processor(controller: Controller, site: Site, original: Any) -> ControlledProcessor:
    """The right wrapper class for ``original``."""
    if isinstance(original, torch.nn.Module):
        return ControlledModuleProcessor(controller, site, original)
    return ControlledProcessor(controller, site, original)
