"""``output.paste_back``: the input composited back outside the mask, with a soft edge."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from attnctl.cli import main
from attnctl.errors import ConfigError
from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.paste_back import paste_back, paste_weights
from harmonpaint_recipe.runner import Runner


def _images():
    rng = np.random.RandomState(3)
    source = Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))
    generated = Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))
    mask = np.zeros((32, 32))
    mask[8:20, 10:22] = 1
    return source, generated, mask


def test_hard_paste_keeps_the_source_outside_and_the_generation_inside():
    source, generated, mask = _images()
    out = np.asarray(paste_back(generated, source, mask, blur=0))
    inside = mask > 0
    assert np.array_equal(out[inside], np.asarray(generated)[inside])
    assert np.array_equal(out[~inside], np.asarray(source)[~inside])


def test_soft_paste_blends_only_a_band_outside_the_mask():
    source, generated, mask = _images()
    out = np.asarray(paste_back(generated, source, mask, blur=2.0)).astype(int)
    w = paste_weights(mask, 2.0)
    assert np.all(w[mask > 0] == 1.0)  # the generated region is kept whole
    band = (w > 0) & (w < 1)
    assert band.any() and not (band & (mask > 0)).any()
    far = w == 0
    assert np.array_equal(out[far], np.asarray(source)[far])
    expected = np.round(np.asarray(source) * (1 - w[..., None]) + np.asarray(generated) * w[..., None])
    assert np.abs(out - expected).max() == 0


def test_runner_pastes_back_exactly_what_the_function_does(tiny_pipe, image_and_mask):
    inputs = prepare_inputs(*image_and_mask)
    plain = load_recipe("sdi", ["sampler.steps=2"])
    pasted = load_recipe("sdi", ["sampler.steps=2", "output.paste_back=true", "output.paste_blur=1.5"])
    with Runner(tiny_pipe, plain) as runner:
        raw = runner(inputs, "a cat", 4).image
    with Runner(tiny_pipe, pasted) as runner:
        composite = runner(inputs, "a cat", 4).image
    assert np.array_equal(np.asarray(composite), np.asarray(paste_back(raw, inputs.image, inputs.mask_array, 1.5)))
    outside = paste_weights(inputs.mask_array, 1.5) == 0
    assert np.array_equal(np.asarray(composite)[outside], np.asarray(inputs.image)[outside])
    assert not np.array_equal(np.asarray(raw)[outside], np.asarray(inputs.image)[outside])  # the control: it moved


def test_paste_back_is_off_in_the_shipped_recipes_and_checked():
    from harmonpaint_recipe.loading import recipe_names

    for name in recipe_names():
        assert load_recipe(name)["output"]["paste_back"] is False, name
    with pytest.raises(ConfigError, match="output.paste_blur: must be at least 0"):
        load_recipe("sdi", ["output.paste_blur=-1"])
    with pytest.raises(ConfigError, match="output.paste_back"):
        load_recipe("sdi", ["output.paste_back=maybe"])


def test_command_line_paste_back_lands_in_the_sidecar(files, capsys):
    out = files / "out.png"
    code = main(["inpaint", "--recipe", "sdi", "--image", str(files / "img.png"), "--mask", str(files / "mask.png"),
                 "--prompt", "a cat", "--out", str(out), "--seed", "1", "model.pretrained=tiny", "sampler.steps=2",
                 "output.paste_back=true"])
    assert code == 0, capsys.readouterr().err
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["recipe"]["output"] == {"paste_back": True, "paste_blur": 2.0}
