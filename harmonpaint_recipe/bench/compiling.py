"""``--compile``: torch.compile the UNet's forward, leaving its hooks eager.

Only ``unet.forward`` is compiled (an instance attribute wrapping the bound method), not
the module: ``torch.compile(unet)`` returns an ``OptimizedModule`` whose submodules are
named ``_orig_mod.*``, and ``unet.compile()`` traces the forward pre-hooks too. Compiling
the forward keeps the module, its names and its hooks as they are, so attnctl's
forward pre-hook (step bookkeeping, latent guidance) runs eagerly and the controlled
processors are traced inside the graph.
"""

from __future__ import annotations

from typing import Any

import torch


def compile_unet(pipe: Any, **options: Any) -> None:
    """Replace ``pipe.unet.forward`` by its compiled version (``options`` go to ``torch.compile``)."""
    unet = pipe.unet
    unet.forward = torch.compile(unet.forward, **options)


def dynamo_counts() -> dict[str, int]:
    """Totals so far from dynamo's counters: graphs compiled (recompilations included), graph
    breaks, frames dynamo gave up on (left to run eagerly) and the unsupported constructs it
    met (an exception raised inside the traced code, the recompile limit, ...)."""
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    return {
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "frames_failed": int(frames.get("total", 0) - frames.get("ok", 0)),
        "unsupported": int(sum(counters["unimplemented"].values())),
    }


def dynamo_reasons() -> dict[str, int]:
    """Dynamo's unsupported constructs so far, by the first line of their message."""
    from torch._dynamo.utils import counters

    reasons: dict[str, int] = {}
    for message, count in counters["unimplemented"].items():
        key = str(message).strip().splitlines()[0][:200]
        reasons[key] = reasons.get(key, 0) + int(count)
    return reasons
