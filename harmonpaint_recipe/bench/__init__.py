"""``attnctl bench``: speed and peak memory of attnctl variants against stock diffusers.

``run_benchmark(BenchConfig(...))`` runs the variants (``stock``, ``idle``,
``sams+makvs``, ``harmonpaint``, ``naive``) interleaved on one random-weight pipeline
and returns a result record; ``write_reports(result, out)`` writes JSON, Markdown and a
PNG chart. See ``docs/benchmarks.md`` for the method and the recorded numbers. Names load
on first use, so the command's help does not import torch.
"""

from __future__ import annotations

from attnctl.lazy import lazy_exports

_EXPORTS = {"BenchConfig": "harmonpaint_recipe.bench.harness", "run_benchmark": "harmonpaint_recipe.bench.harness",
            "write_reports": "harmonpaint_recipe.bench.report"}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
