"""``attnctl probe``: one recipe or two side by side; pictures, curves and every number in one folder."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from attnctl.cli import main

TINY = ["model.pretrained=tiny", "sampler.steps=3"]



def _inputs(files):
    return ["--image", str(files / "img.png"), "--mask", str(files / "mask.png"), "--prompt", "a small owl"]


def test_compare_writes_both_images_side_by_side_pictures_and_one_json(files, capsys):
    out = files / "probe"
    rc = main(["probe", "--compare", "sdi", "harmonpaint", *_inputs(files), "--out-dir", str(out), "--seed", "4",
               "--probes", "cross_maps,self_pca,curves", *TINY, "probes.cross_maps.steps=[0, -1]"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["A-sdi.png", "B-harmonpaint.png", "cross_maps.png", "curves.png",
                                                     "probes.json", "self_pca.png"]
    record = json.loads((out / "probes.json").read_text())
    assert record["seed"] == 4 and record["recipes"] == ["sdi", "harmonpaint"]
    assert [r["label"] for r in record["runs"]] == ["sdi", "harmonpaint"] and record["runs"][0]["image"] == "A-sdi.png"
    maps = record["runs"][1]["probes"]["cross_maps"]
    assert [s["step"] for s in maps["steps"]] == [0, 2] and maps["maps"]  # the chosen steps, every number
    assert record["runs"][1]["probes"]["curves"]["guidance"]["steer"]  # harmonpaint logs its steer loss
    assert record["runs"][0]["probes"]["curves"]["guidance"] == {}  # sdi has none
    single = Image.open(files / "probe" / "self_pca.png")
    assert single.width > 600  # two runs side by side
    assert "probe" in capsys.readouterr().err  # the progress bar goes to stderr


def test_one_recipe_defaults_to_harmonpaint_with_maps_and_curves(files):
    out = files / "one"
    assert main(["probe", *_inputs(files), "--out-dir", str(out), *TINY]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cross_maps.png", "curves.png", "image.png", "probes.json"]
    record = json.loads((out / "probes.json").read_text())
    assert record["recipes"] == ["harmonpaint"] and isinstance(record["seed"], int)  # a random seed, recorded


@pytest.mark.parametrize("argv,message", [
    (["--out-dir", "x"], "missing --image, --mask, --prompt"),
    (["--image", "a.png", "--mask", "m.png", "--prompt", "p"], "missing --out-dir"),
    (["--image", "a.png", "--mask", "m.png", "--prompt", "p", "--out-dir", "o", "--recipe", "sdi",
      "--compare", "sdi", "harmonpaint"], "--compare A B runs both recipes; drop --recipe"),
    (["--image", "a.png", "--mask", "m.png", "--prompt", "p", "--out-dir", "o", "sampler.steps"],
     "overrides are key=value"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    assert main(["probe", *argv]) == 2
    assert message in capsys.readouterr().err


def test_probe_names_and_settings_are_checked_before_any_model_work(files, capsys):
    out = files / "bad"
    assert main(["probe", *_inputs(files), "--out-dir", str(out), "--probes", "cross_map", *TINY]) == 2
    assert "unknown strategy 'cross_map' in probes.cross_map" in capsys.readouterr().err
    assert main(["probe", "--compare", "harmonpaint", "harmonpaint-sdxl", *_inputs(files), "--out-dir", str(out)]) == 2
    assert "their model sections differ" in capsys.readouterr().err  # one pipeline runs both
    assert not any(out.iterdir())


def test_an_output_folder_holding_an_input_is_refused(files, capsys):
    (files / "image.png").write_bytes((files / "img.png").read_bytes())
    rc = main(["probe", "--image", str(files / "image.png"), "--mask", str(files / "mask.png"), "--prompt", "p",
               "--out-dir", str(files), *TINY])
    assert rc == 2 and "would overwrite the input" in capsys.readouterr().err
