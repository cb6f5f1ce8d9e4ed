"""Atomic writes: complete files, no temporaries left, permissions from the umask."""

from __future__ import annotations

import os
import stat

import pytest
from PIL import Image

from harmonpaint_recipe.files import atomic_save_image, atomic_write_text, current_umask


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "a.json", "{}\n")
        atomic_save_image(tmp_path / "b.png", Image.new("RGB", (8, 8)))
    finally:
        os.umask(old)
    for name in ("a.json", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "a.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]
