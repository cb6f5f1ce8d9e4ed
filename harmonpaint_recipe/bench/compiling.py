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


def graph_report(pipe: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``torch._dynamo.explain`` of one UNet call: graph count, break count and reasons."""
    unet = pipe.unet
    forward = getattr(unet.forward, "_torchdynamo_orig_callable", unet.forward)
    explanation = torch._dynamo.explain(forward)(*args, **kwargs)
    return {
        "graphs": explanation.graph_count,
        "graph_breaks": explanation.graph_break_count,
        "reasons": sorted({_where(b) for b in explanation.break_reasons}),
    }


def _where(reason: Any) -> str:
    frames = [f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in reason.user_stack[-2:]]
    return f"{reason.reason.splitlines()[0][:120]} at {' <- '.join(reversed(frames))}"
