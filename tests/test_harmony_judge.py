"""The harmony judge rewards the background's pattern continued through the object, not texture.

Controls on held-out ground truth (split ``eval``): a flat object with Gaussian noise,
inside the mask or everywhere, must score at least as badly as the flat object itself
(within its confidence interval); an object in another style must score badly; styled and
flat truths must separate (AUC >= 0.95). Kinds the judge never saw in fitting are checked too.
"""

from __future__ import annotations

import numpy as np
import pytest

from attnctl.errors import ConfigError, InputError
from harmonpaint_recipe.testbed import world
from harmonpaint_recipe.testbed.controls import NOISE_SIGMAS, control_scores
from harmonpaint_recipe.testbed.harmony import HarmonyJudge
from harmonpaint_recipe.testbed.models import WEIGHTS_DIR

JUDGE = WEIGHTS_DIR / "judges" / "harmony.safetensors"
SCENES = 60
#: both saturate at the judge's certainty (probabilities within 1e-6 of 1): differences below this are ties
TIE = 1e-3


@pytest.fixture(scope="module")
def judge():
    return HarmonyJudge.load(JUDGE)


@pytest.fixture(scope="module")
def controls(judge):
    return control_scores(judge, count=SCENES, split="eval", mask_kind=None, seed=1).summary(bootstrap=500)


def test_public_entry_scores_styled_near_zero_and_flat_near_one(judge):
    rendered = [world.render_scene(world.sample_scene(i, "calibrate")) for i in range(60)]
    styled = np.mean([judge.score(r.styled, r.mask > 0) for r in rendered])
    flat = np.mean([judge.score(r.flat, r.mask > 0) for r in rendered])
    assert abs(styled) < 0.1 and abs(flat - 1) < 0.1


def test_styled_and_flat_truth_separate(controls):
    assert controls["auc_styled_vs_flat"] >= 0.95


@pytest.mark.parametrize("where", ["mask", "all"])
@pytest.mark.parametrize("sigma", NOISE_SIGMAS)
def test_noise_on_a_flat_object_is_no_harmony(controls, sigma, where):
    noisy, flat = controls[f"flat+noise{sigma}-{where}"], controls["flat"]
    assert noisy["mean"] >= flat["low"] - TIE, (noisy, flat)


def test_another_style_in_the_object_scores_badly(controls):
    assert controls["wrong_style"]["mean"] >= 0.5
    assert controls["styled"]["mean"] <= 0.1


def test_kinds_never_fitted_on_still_fail(controls):
    for kind in ("uniform_noise", "salt_pepper"):
        assert controls[kind]["mean"] >= controls["flat"]["low"] - TIE, kind


def test_noise_over_a_styled_scene_keeps_it_harmonious(controls):
    """The judge asks for the pattern, not for clean pixels: noise over the whole styled scene stays near 0."""
    assert controls["styled+noise8-all"]["mean"] <= 0.2


def test_every_style_is_judged(controls):
    for style in world.STYLES:
        assert controls["styled"]["by_style"][style] < 0.3, style
        assert controls["flat"]["by_style"][style] > 0.7, style


def test_bad_inputs_and_old_files_are_refused(judge, tmp_path):
    image = world.render(world.sample_scene(0, "eval"), "flat")
    with pytest.raises(InputError, match="mask is empty"):
        judge.score(image, np.zeros((64, 64), bool))
    with pytest.raises(InputError, match="background pixels"):
        judge.score(image, np.ones((64, 64), bool))
    with pytest.raises(InputError, match=r"\[N, H, W\] masks"):
        judge.score(image, np.ones((32, 32), bool))
    from safetensors.torch import save_file
    import torch

    save_file({"calibration": torch.zeros(2, 2, dtype=torch.float64)}, str(tmp_path / "old.safetensors"))
    with pytest.raises(ConfigError, match="no network weights"):
        HarmonyJudge.load(tmp_path / "old.safetensors")
    with pytest.raises(ConfigError, match="not found"):
        HarmonyJudge.load(tmp_path / "missing.safetensors")


def test_a_picture_turned_into_one_texture_fails_on_the_input_background(judge):
    """Judged on the input's background (``source``), a region cannot pass by taking the whole
    picture, background included, into the same texture."""
    from harmonpaint_recipe.testbed.harmony_examples import _blotches

    rng = np.random.default_rng(2)
    scores = []
    for i in range(20):
        scene = world.sample_scene(i, "eval", mask_kind="box")
        rendered = world.render_scene(scene)
        garbage = (_blotches((64, 64), rng) * 255).astype(np.uint8)
        scores.append(judge.score(garbage, rendered.mask > 0, source=world.render(scene, "background")))
    assert np.mean(scores) >= 0.9
