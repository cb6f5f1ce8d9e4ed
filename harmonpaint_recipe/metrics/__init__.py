"""Image-quality metrics for inpainting evaluation (CS, CMMD, AS, IR, unmasked-region preservation).

Each metric is a small class with injectable models; :mod:`harmonpaint_recipe.metrics.registry` maps the
command-line names (``cs``, ``cmmd``, ``as``, ``ir``, ``preserve``) to them. A metric that
cannot run (missing package, weights not available offline) reports ``None`` together with
an ``unavailable_reason``; it never makes a number up. Names load on first use (the
command line's help needs only ``metrics.defaults``).
"""

from __future__ import annotations

from attnctl.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("Metric", "MetricResult", "MetricUnavailable", "Sample"), "harmonpaint_recipe.metrics.base"),
    **dict.fromkeys(("METRICS", "MetricOptions", "build_metrics", "parse_metric_names"),
                    "harmonpaint_recipe.metrics.registry"),
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
