"""Recipes: shipped defaults, composition, overrides, interpolation, validation errors."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from attnctl.errors import ConfigError
from harmonpaint_recipe.api import keyword_overrides
from harmonpaint_recipe.loading import load_recipe, recipe_names, resolved

SHIPPED = ["attend-excite", "attentive-eraser", "harmonpaint", "harmonpaint-masked-step", "harmonpaint-natural",
           "harmonpaint-flux-fill", "harmonpaint-sams", "harmonpaint-sams-steer", "harmonpaint-sd3", "harmonpaint-sdxl", "hd-painter", "masactrl", "masactrl-real", "p2p-refine",
           "p2p-replace", "p2p-reweight", "pag", "reference-only", "sdi", "seg", "style-aligned", "style-aligned-real",
           "visual-style-prompting"]


def enabled(cfg) -> set[str]:
    return {name for name, s in resolved(cfg)["strategies"].items() if s["enabled"]}


def test_shipped_recipes_are_listed_and_valid():
    assert recipe_names() == sorted(SHIPPED)
    for name in SHIPPED:
        assert load_recipe(name).description


def test_harmonpaint_defaults_match_the_spec():
    cfg = resolved(load_recipe("harmonpaint"))
    assert cfg["model"]["pretrained"] == "stable-diffusion-v1-5/stable-diffusion-inpainting"
    assert (cfg["sampler"]["scheduler"], cfg["sampler"]["steps"], cfg["sampler"]["guidance_scale"]) == ("ddim", 50, 7.5)
    s = cfg["strategies"]
    assert (s["sams"]["strategy"], s["sams"]["sites"], s["sams"]["tau"]) == ("region_mask", "self[2:7]", 0.1)
    assert s["sams"]["renormalize"] is False
    assert (s["makvs"]["strategy"], s["makvs"]["sites"], s["makvs"]["scale"]) == ("kv_bank", "self[-8:]", 1.4)
    assert (s["steer"]["strategy"], s["steer"]["read_sites"], s["steer"]["step_size"]) == (
        "latent_guidance", "cross/4,cross/2", 20.0)
    assert s["phases"]["rules"] == {"sams": {"min": 0.6}, "steer": {"min": 0.6}, "makvs": {"max": 0.6}}


def test_variants_switch_the_right_components():
    assert enabled(load_recipe("harmonpaint")) == {"sams", "steer", "makvs", "phases"}
    assert enabled(load_recipe("sdi")) == set()
    assert enabled(load_recipe("harmonpaint-sams")) == {"sams", "phases"}
    assert enabled(load_recipe("harmonpaint-sams-steer")) == {"sams", "steer", "phases"}
    assert resolved(load_recipe("harmonpaint-natural"))["strategies"]["makvs"]["scale"] == 0.8


def test_eta_interpolation_reaches_every_gate_rule():
    cfg = load_recipe("harmonpaint", ["eta=0.4"])
    assert resolved(cfg)["strategies"]["phases"]["rules"] == {"sams": {"min": 0.4}, "steer": {"min": 0.4}, "makvs": {"max": 0.4}}
    # interpolation is kept: a later override of eta still reaches the rules
    again = load_recipe(cfg, {"eta": 0.7})
    assert resolved(again)["strategies"]["phases"]["rules"]["makvs"] == {"max": 0.7}


def test_dotlist_mapping_and_keyword_overrides():
    cfg = resolved(load_recipe("harmonpaint", ["strategies.makvs.enabled=false", "sampler.steps=3"]))
    assert cfg["strategies"]["makvs"]["enabled"] is False and cfg["sampler"]["steps"] == 3
    kw = keyword_overrides({"strategies__makvs__scale": 0.8, "sampler__steps": 4})
    assert kw == {"strategies.makvs.scale": 0.8, "sampler.steps": 4}
    cfg = resolved(load_recipe("harmonpaint", kw))
    assert (cfg["strategies"]["makvs"]["scale"], cfg["sampler"]["steps"]) == (0.8, 4)


def test_user_yaml_composes_from_a_shipped_recipe(tmp_path):
    user = tmp_path / "mine.yaml"
    user.write_text(
        "defaults: [harmonpaint]\n"
        "description: mine\n"
        "eta: 0.5\n"
        "strategies:\n"
        "  makvs: {scale: 1.1}\n"
        "  steer: {tokens: [1, 2, 3]}\n"
    )
    cfg = resolved(load_recipe(str(user), ["strategies.steer.tokens=[2]"]))
    assert cfg["description"] == "mine"
    assert cfg["strategies"]["makvs"]["scale"] == 1.1
    assert cfg["strategies"]["steer"]["tokens"] == [2]  # lists are replaced, not merged
    assert cfg["strategies"]["sams"]["tau"] == 0.1  # inherited
    assert cfg["strategies"]["phases"]["rules"]["sams"] == {"min": 0.5}


def test_recipes_cannot_instantiate_python(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: [harmonpaint]\nstrategies:\n  evil: {_target_: os.system}\n")
    with pytest.raises(ConfigError, match=r"recipe key 'strategies.evil._target_' is not allowed: recipes cannot import or run Python"):
        load_recipe(str(bad))


def test_unknown_and_mistyped_keys_name_the_key():
    with pytest.raises(ConfigError, match=r"unknown recipe key 'sampler.step' \(did you mean 'steps'\?\)"):
        load_recipe("harmonpaint", ["sampler.step=3"])
    with pytest.raises(ConfigError, match=r"^sampler.guidance_scale: expected float, got str 'high'$"):
        load_recipe("harmonpaint", ["sampler.guidance_scale=high"])
    with pytest.raises(ConfigError, match=r"unknown parameter 'strategies.sams.ta' for strategy 'region_mask' \(did you mean 'tau'\?\)"):
        load_recipe("harmonpaint", ["strategies.sams.ta=0.2"])
    with pytest.raises(ConfigError, match=r"^strategies.makvs.scale: expected float, got str 'big'$"):
        load_recipe("harmonpaint", ["strategies.makvs.scale=big"])
    with pytest.raises(ConfigError, match=r"strategies: expected a mapping of instance name -> settings, got a list"):
        load_recipe(OmegaConf.create({"strategies": [{"strategy": "kv_bank"}]}))
    with pytest.raises(ConfigError, match=r"model.dtype: expected one of auto, fp32, fp16, bf16, got 'fp8'"):
        load_recipe("harmonpaint", ["model.dtype=fp8"])


def test_defaults_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="recipe defaults form a cycle"):
        load_recipe(str(tmp_path / "a.yaml"))
