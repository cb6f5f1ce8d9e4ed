"""Image-quality metrics for inpainting evaluation (CS, CMMD, AS, IR, unmasked-region preservation).

Each metric is a small class with injectable models; :mod:`harmonpaint_recipe.metrics.registry` maps the
command-line names (``cs``, ``cmmd``, ``as``, ``ir``, ``preserve``) to them. A metric that
cannot run (missing package, weights not available offline) reports ``None`` together with
an ``unavailable_reason``; it never makes a number up.
"""

from harmonpaint_recipe.metrics.base import Metric, MetricResult, MetricUnavailable, Sample
from harmonpaint_recipe.metrics.registry import METRICS, MetricOptions, build_metrics, parse_metric_names

__all__ = [
    "METRICS",
    "Metric",
    "MetricOptions",
    "MetricResult",
    "MetricUnavailable",
    "Sample",
    "build_metrics",
    "parse_metric_names",
]
