"""``attnctl bench``: speed and peak memory of attnctl variants against stock diffusers.

``run_benchmark(BenchConfig(...))`` runs the variants (``stock``, ``idle``,
``sams+makvs``, ``harmonpaint``, ``naive``) interleaved on one random-weight pipeline
and returns a result record; ``write_reports(result, out)`` writes JSON, Markdown and a
PNG chart. See ``docs/benchmarks.md`` for the method and the recorded numbers.
"""

from harmonpaint_recipe.bench.harness import BenchConfig, run_benchmark
from harmonpaint_recipe.bench.report import write_reports

__all__ = ["BenchConfig", "run_benchmark", "write_reports"]
