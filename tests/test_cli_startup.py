"""The command line starts fast: help and listings load neither torch nor diffusers.

Measured with ``python -X importtime -m attnctl strategies``: importing torch alone takes
seconds; these commands need pluggy, omegaconf and the strategies' parameter dataclasses only.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "diffusers", "transformers", "numpy", "PIL")


@pytest.mark.parametrize("argv", [["--help"], ["strategies"], ["recipes"], ["recipe", "show", "harmonpaint"],
                                  ["inpaint", "--help"], ["bench", "--help"], ["eval", "--help"],
                                  ["probe", "--help"]])
def test_command_does_not_import_heavy_libraries(argv):
    code = (
        "import sys\n"
        "from attnctl.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out
