"""Optional dependencies: checked before a command starts its work, with the extra to install.

Commands that need an optional package call ``require(...)`` first, so a missing package is
one line naming the install command, not a traceback after minutes of work.
"""

from __future__ import annotations

import importlib.util

from attnctl.errors import InputError

#: import name -> the name pip installs it under
PIP_NAMES = {"skimage": "scikit-image", "matplotlib": "matplotlib", "psutil": "psutil", "gradio": "gradio",
             "torchmetrics": "torchmetrics", "accelerate": "accelerate"}


def missing(*modules: str) -> list[str]:
    """The modules among ``modules`` that cannot be imported here."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(extra: str, *modules: str, what: str) -> None:
    """Raise ``InputError`` if any of ``modules`` is missing, naming ``what`` needs it and the extra."""
    absent = missing(*modules)
    if absent:
        names = " ".join(PIP_NAMES.get(m, m) for m in absent)
        raise InputError(
            f"{what} needs {', '.join(PIP_NAMES.get(m, m) for m in absent)}, not installed here; "
            f'install the {extra} extra (pip install -e ".[{extra}]") or pip install {names}'
        )
