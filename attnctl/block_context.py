"""The transformer block around a site: what it got, for ops that need more than the attention call.

A few methods read beyond one attention module. HD-Painter's PAIntA, at a block's
self-attention, looks ahead through the same block's cross-attention on the true residual
stream: ``attn2.to_q(norm2(x + y))`` with ``x`` the block's input and ``y`` the
self-attention's output. A site op that sets ``needs_block = True`` gets, through
``call.block``, the module that holds the site (diffusers' ``BasicTransformerBlock``), the
hidden states it was called with and its text embeddings, recorded by a forward pre-hook
that attnctl puts on that module only while such an op is planned there.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:
    import torch

    from attnctl.sites import Site


@dataclass(frozen=True)
class BlockInput:
    """One call of the module that holds a site (batch rows as the site's attention call).

    Attributes:
        module: the block (e.g. a ``BasicTransformerBlock``: ``norm1``, ``attn1``, ``norm2``, ``attn2``).
        hidden_states: its input, the residual stream before its first norm ``[B, N, C]``.
        encoder_hidden_states: the text embeddings it got (None if none).
    """

    module: torch.nn.Module
    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor | None


def block_name(site: Site) -> str:
    """The name of the module holding ``site`` (its parent in the UNet)."""
    return site.name.rpartition(".")[0]


def blocks_needed(site_ops: dict[str, Iterable[Any]], sites: Any) -> list[str]:
    """Names of the blocks whose input some planned op reads (``needs_block``), in site order."""
    names = [block_name(sites.by_name(name)) for name, ops in site_ops.items()
             if any(getattr(op, "needs_block", False) for op in ops)]
    return list(dict.fromkeys(names))


def block_recorder(name: str, module: torch.nn.Module, current: Callable[[], Any]) -> Callable:
    """A forward pre-hook (``with_kwargs``) that records the block's input in ``current()``, the run
    state in progress (or None: nothing to record)."""
    try:
        positional = tuple(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        positional = ("hidden_states", "attention_mask", "encoder_hidden_states")

    def argument(args: tuple, kwargs: dict, key: str) -> Any:
        if key in kwargs:
            return kwargs[key]
        i = positional.index(key) if key in positional else None
        return args[i] if i is not None and i < len(args) else None

    def record(mod, args, kwargs):
        state = current()
        if state is not None:
            state.blocks[name] = BlockInput(mod, argument(args, kwargs, "hidden_states"),
                                            argument(args, kwargs, "encoder_hidden_states"))

    return record
