"""Load ``examples/region_boost_plugin.py`` (the documented third-party plugin) as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "region_boost" / "region_boost_plugin.py"


def load_region_boost():
    """The example plugin module, registered in ``sys.modules`` (dataclasses look their module up there)."""
    if "region_boost_plugin" in sys.modules:
        return sys.modules["region_boost_plugin"]
    spec = importlib.util.spec_from_file_location("region_boost_plugin", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
