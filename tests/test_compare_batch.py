"""``attnctl inpaint --manifest ... --compare RECIPE``: the same items and seeds with a second recipe,
a side-by-side grid, and the change outside the mask of each."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

import harmonpaint_recipe as hp
from attnctl.cli import main
from harmonpaint_recipe.compare_batch import background_error
from harmonpaint_recipe.inputs import prepare_inputs


def _manifest(files):
    (files / "items.jsonl").write_text(
        json.dumps({"image": "img.png", "mask": "mask.png", "prompt": "a dog", "seed": 3, "name": "first"}) + "\n"
        + json.dumps({"image": "img.png", "mask": "mask.png", "prompt": "a boat", "name": "second"}) + "\n"
    )
    return files / "items.jsonl"


def test_compare_runs_the_second_recipe_on_the_same_seeds(files, capsys, tiny_pipe):
    argv = ["inpaint", "--recipe", "harmonpaint", "--manifest", str(_manifest(files)), "--out-dir", str(files / "res"),
            "--compare", "sdi", "model.pretrained=tiny", "sampler.steps=2"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "compare.png" in out and "input | sdi | harmonpaint" in out
    res = files / "res"
    for name in ("first", "second"):
        main_seed = json.loads((res / f"{name}.json").read_text())["seed"]
        twin = json.loads((res / "compare-sdi" / f"{name}.json").read_text())
        assert twin["seed"] == main_seed and twin["recipe_name"] == "sdi"
    # the compared image is what the Python API makes with that recipe and seed
    seed = json.loads((res / "second.json").read_text())["seed"]
    api = hp.inpaint(files / "img.png", files / "mask.png", "a boat", recipe="sdi", pipe=tiny_pipe, seed=seed,
                     overrides=["sampler.steps=2"])
    assert np.array_equal(np.asarray(api), np.asarray(Image.open(res / "compare-sdi" / "second.png")))
    grid = Image.open(res / "compare.png")
    assert grid.size[0] == 3 * 160 and grid.size[1] > 2 * 160
    summary = json.loads((res / "compare.json").read_text())
    inputs = prepare_inputs(files / "img.png", files / "mask.png")
    expected = background_error(Image.open(res / "first.png"), inputs)
    assert summary["background_mae"]["harmonpaint"][0] == round(expected, 3)
    assert summary["ratio"] == summary["mean_background_mae"]["harmonpaint"] / summary["mean_background_mae"]["sdi"]


def test_background_error_is_zero_for_the_input_and_grows_with_a_change(files):
    inputs = prepare_inputs(files / "img.png", files / "mask.png")
    assert background_error(inputs.image, inputs) == 0.0
    shifted = Image.fromarray(np.clip(np.asarray(inputs.image).astype(int) + 10, 0, 255).astype("uint8"))
    assert 5.0 < background_error(shifted, inputs) <= 10.0
    inside_only = np.asarray(inputs.image).copy()
    inside_only[inputs.mask_array >= 0.5] = 0
    assert background_error(Image.fromarray(inside_only), inputs) == 0.0


def test_compare_with_an_unknown_recipe_fails_before_any_work(files, capsys):
    argv = ["inpaint", "--recipe", "sdi", "--manifest", str(_manifest(files)), "--out-dir", str(files / "res"),
            "--compare", "sdii", "model.pretrained=tiny"]
    assert main(argv) != 0
    assert "--compare sdii" in capsys.readouterr().err
    assert not (files / "res").exists()
