"""The documented third-party plugin, installed through its entry point, composes with HarmonPaint
from the command line exactly as docs/writing-strategies.md shows."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from attnctl.cli import main

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "examples" / "region_boost"


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """The example package as pip would leave it: the module and a dist-info with its entry point."""
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(PLUGIN_DIR / "region_boost_plugin.py", site)
    info = site / "attnctl_region_boost-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: attnctl-region-boost\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[attnctl.strategies]\nregion_boost = region_boost_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "region_boost_plugin", raising=False)
    return site


def test_strategies_lists_the_installed_plugin(installed_plugin, capsys):
    assert main(["strategies"]) == 0
    assert "region_boost" in capsys.readouterr().out


def test_plugin_recipe_runs_next_to_harmonpaint_from_the_cli(installed_plugin, tmp_path, image_and_mask):
    image, mask = image_and_mask
    image.save(tmp_path / "img.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    rc = main(["inpaint", "--recipe", str(PLUGIN_DIR / "harmonpaint-boost.yaml"), "--image", str(tmp_path / "img.png"),
               "--mask", str(tmp_path / "mask.png"), "--prompt", "a small owl", "--out", str(out), "--seed", "0",
               "model.pretrained=tiny", "sampler.steps=4"])
    assert rc == 0 and Image.open(out).size == (64, 64)
    strategies = json.loads(out.with_suffix(".json").read_text())["recipe"]["strategies"]
    boost = strategies["boost"]
    assert (boost["strategy"], boost["sites"], boost["gain"]) == ("region_boost", "self@up", 2.0)
    assert {"sams", "steer", "makvs", "phases"} <= set(strategies)
