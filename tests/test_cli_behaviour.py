"""How the command line treats a newcomer: options anywhere, one-line errors and warnings,
broken plugins reported and skipped, defaults that fit the model."""

from __future__ import annotations

import json
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import attnctl
from attnctl.cli import main

TINY = ["model.pretrained=tiny", "sampler.steps=2"]


def test_options_and_overrides_mix_in_any_order(files):
    out = files / "mixed.png"
    rc = main(["inpaint", "--recipe", "harmonpaint", "strategies.makvs.scale=0.8", "--seed", "1",
               "--image", str(files / "img.png"), "model.pretrained=tiny", "--mask", str(files / "mask.png"),
               "--prompt", "a cat", "sampler.steps=2", "--out", str(out)])
    assert rc == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["seed"] == 1 and record["recipe"]["strategies"]["makvs"]["scale"] == 0.8


def test_warnings_print_as_one_line_naming_the_command(files, capsys):
    out = files / "w.png"
    assert main(["inpaint", "--image", str(files / "img.png"), "--mask", str(files / "mask.png"), "--prompt", "a cat",
                 "--out", str(out), "sampler.strength=0.5", *TINY]) == 0
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "will not act in this run" in l]
    assert lines and all(l.startswith("attnctl inpaint: warning: strategies.") for l in lines)
    assert "args_kwargs_result" not in err  # no source line from inside torch
    assert "requires torchvision" not in err  # a notice nobody can act on


def test_file_system_errors_are_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["dataset", "sample", "--out", str(blocker / "sub"), "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert any(l.startswith("attnctl dataset sample: error:") and str(blocker) in l for l in err.splitlines())
    assert "Traceback" not in err


def test_stylize_names_a_missing_mask_file(tmp_path, capsys):
    (tmp_path / "content").mkdir()
    (tmp_path / "styles").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "content" / "a.png")
    Image.new("RGB", (32, 32)).save(tmp_path / "styles" / "s.png")
    (tmp_path / "ann.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a cat", "mask": "gone.png"}) + "\n")
    rc = main(["dataset", "stylize", "--content", str(tmp_path / "content"), "--styles", str(tmp_path / "styles"),
               "--annotations", str(tmp_path / "ann.jsonl"), "--out", str(tmp_path / "out"), "--size", "32"])
    assert rc == 2 and "mask file" in capsys.readouterr().err


def test_sites_knows_the_tiny_models_and_each_models_own_size(capsys):
    assert main(["sites", "tiny"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "# tiny: sites at 64x64 (latent 8x8)"
    assert main(["sites", "sdxl-inpaint"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "# sdxl-inpaint: sites at 1024x1024 (latent 128x128)"


def test_recipe_show_lists_every_parameter_a_run_uses(capsys):
    assert main(["recipe", "show", "harmonpaint"]) == 0
    out = capsys.readouterr().out
    for line in ("source_image: 0", "renormalize: false", "stop_early: true", "enabled: true"):
        assert line in out


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """An installed third-party strategy plugin whose module fails to import."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "broken_strategy.py").write_text("import not_a_module_anywhere\n")
    info = site / "broken_strategy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-strategy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[attnctl.strategies]\nbroken = broken_strategy\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def test_a_broken_plugin_is_reported_and_the_rest_works(broken_plugin, capsys):
    with pytest.warns(attnctl.PluginWarning, match="plugin 'broken'.*broken-strategy.*ATTNCTL_DISABLE_PLUGIN_AUTOLOAD"):
        manager = attnctl.StrategyManager()
    assert {"region_mask", "kv_bank", "latent_guidance", "timestep_gate"} <= set(manager.strategies())
    with pytest.raises(attnctl.ConfigError, match="unknown strategy 'brokn'.*plugin 'broken'.*failed to load"):
        manager.spec("brokn", "strategies.x")
    assert main(["strategies"]) == 0
    captured = capsys.readouterr()
    assert "region_mask" in captured.out and "plugin 'broken'" in captured.err


def test_run_accepts_pil_numpy_and_tensor_masks(tiny_pipe, image_and_mask):
    _, mask = image_and_mask
    config = {"strategies": {"sams": {"strategy": "region_mask", "sites": "self[0:4]"}}}
    as_array = np.array(mask)
    masks = [mask, as_array, as_array > 127, torch.from_numpy(as_array / 255.0), [mask]]
    with attnctl.attach(tiny_pipe, config) as ctl:
        for m in masks:
            with ctl.run(attnctl.BatchLayout.for_pipeline(1), mask=m) as state:
                assert torch.equal(state._mask_input, (torch.from_numpy(as_array)[None, None] >= 128).float())
        with pytest.raises(attnctl.InputError, match="cannot use a str; give a torch tensor or numpy array"):
            with ctl.run(attnctl.BatchLayout.for_pipeline(1), mask="mask.png"):
                pass


def test_commands_name_the_extra_a_missing_package_is_in(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["bench", "--arch", "tiny", "--steps", "1", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "attnctl bench: error: attnctl bench (memory sampling, the PNG chart) needs matplotlib" in err
    assert 'pip install -e ".[bench]"' in err


def test_threads_default_to_one_for_tiny_models_and_are_recorded(files, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    try:
        out = files / "t.png"
        assert main(["inpaint", "--image", str(files / "img.png"), "--mask", str(files / "mask.png"),
                     "--prompt", "a cat", "--out", str(out), "--seed", "3", *TINY]) == 0
        record = json.loads(out.with_suffix(".json").read_text())
        assert record["threads"] == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        again = files / "again.png"
        assert main(["inpaint", "--from", str(out.with_suffix(".json")), "--out", str(again)]) == 0
        assert torch.get_num_threads() == 1  # the sidecar's count, so the image is bit-identical
        assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
        assert main(["inpaint", "--image", str(files / "img.png"), "--mask", str(files / "mask.png"),
                     "--prompt", "a cat", "--out", str(files / "t2.png"), "--threads", "2", *TINY]) == 0
        assert json.loads((files / "t2.json").read_text())["threads"] == 2
    finally:
        torch.set_num_threads(1)


def test_an_unreachable_hub_fails_at_once_with_the_ways_out(files, monkeypatch, capsys):
    import socket
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    start = time.perf_counter()
    rc = main(["inpaint", "--image", str(files / "img.png"), "--mask", str(files / "mask.png"), "--prompt", "a cat",
               "--out", str(files / "hub.png"), "model.pretrained=some-org/not-cached-inpainting"])
    assert rc == 2 and time.perf_counter() - start < 30
    err = capsys.readouterr().err
    assert "hub is not reachable" in err
    for hint in ("model.pretrained=/path/to/", "HF_HUB_OFFLINE=1", "model.local_files_only=true"):
        assert hint in err
