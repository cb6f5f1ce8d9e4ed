"""One loader for every command: the same built-in names (entry points ``attnctl.models``),
the same local-folder check and the same offline rule for ``sites``, ``inpaint`` and the rest."""

from __future__ import annotations


import pytest

import attnctl
from attnctl.cli import main
from attnctl.models import model_names, named_model


@pytest.fixture
def model_plugin(tmp_path, monkeypatch):
    """An installed package adding two models: ``my-tiny`` (works) and ``my-broken`` (fails to import)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "my_models.py").write_text(
        "from attnctl.testing import build_tiny_inpaint_pipeline\n\n"
        "def my_tiny():\n    return build_tiny_inpaint_pipeline(seed=3)\n"
    )
    info = site / "my_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[attnctl.models]\nmy-tiny = my_models:my_tiny\nmy-broken = not_a_module_anywhere:make\n")
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def offline(monkeypatch, no_network):
    """No network: every connection is refused; the attempts are counted."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return no_network


def test_the_built_in_names_are_shared():
    assert {"tiny", "tiny-sdxl", "testbed"} <= set(model_names())


@pytest.mark.parametrize("name, first_line", [
    ("testbed", "# testbed: sites at 64x64 (latent 16x16)"),
    ("tiny", "# tiny: sites at 64x64 (latent 8x8)"),
])
def test_sites_knows_every_built_in_model_and_never_asks_the_hub(name, first_line, offline, capsys):
    assert main(["sites", name]) == 0
    assert capsys.readouterr().out.splitlines()[0] == first_line
    assert offline == []


def test_sites_offline_asks_the_hub_once_and_fails_with_the_ways_out(offline, capsys):
    assert main(["sites", "tetsbed"]) == 2
    err = capsys.readouterr().err
    # attnctl's reachability check, then at most the hub client's own one-off lookup (its agent
    # registry, fetched once per process with a short timeout); no file request, no retries
    assert 1 <= len(offline) <= 2
    assert "hub is not reachable" in err
    assert "cannot load model 'tetsbed' (did you mean 'testbed'?)" in err
    for hint in ("attnctl sites /path/to/", "HF_HUB_OFFLINE=1", "built-in models:", "testbed", "tiny-sdxl"):
        assert hint in err
    assert "Traceback" not in err and "Retrying" not in err


def test_with_hf_hub_offline_nothing_is_asked(offline, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["sites", "some-org/some-inpainting"]) == 2
    assert offline == [] and "cannot load model 'some-org/some-inpainting'" in capsys.readouterr().err


def test_sites_and_inpaint_refuse_a_folder_that_is_not_a_pipeline_alike(tmp_path, files, capsys):
    folder = tmp_path / "weights"
    folder.mkdir()
    assert main(["sites", str(folder)]) == 2
    sites_err = capsys.readouterr().err
    assert main(["inpaint", "--image", str(files / "img.png"), "--mask", str(files / "mask.png"), "--prompt", "a cat",
                 "--out", str(files / "o.png"), f"model.pretrained={folder}"]) == 2
    inpaint_err = capsys.readouterr().err
    for err in (sites_err, inpaint_err):
        assert f"'{folder}' is not a diffusers pipeline folder (no model_index.json)" in err


def test_a_plugin_model_serves_every_command_and_a_broken_one_is_skipped(model_plugin, files, capsys):
    assert "my-tiny" in model_names()
    with pytest.warns(attnctl.PluginWarning, match="model 'my-broken'.*my-models.*ModuleNotFoundError"):
        assert named_model("my-broken") is None
    assert main(["sites", "my-tiny"]) == 0
    assert capsys.readouterr().out.startswith("# my-tiny: sites at 64x64")
    out = files / "plugin.png"
    assert main(["inpaint", "--recipe", "sdi", "--image", str(files / "img.png"), "--mask", str(files / "mask.png"),
                 "--prompt", "a cat", "--out", str(out), "model.pretrained=my-tiny", "sampler.steps=2"]) == 0
    assert out.is_file()
