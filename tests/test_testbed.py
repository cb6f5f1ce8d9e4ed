"""The offline testbed: world, tokenizer, judges, shipped weights, training and eval plumbing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from attnctl.cli import main
from attnctl.errors import ConfigError, InputError
from harmonpaint_recipe.testbed import world
from harmonpaint_recipe.testbed.models import UNET_CONFIG, WEIGHTS_DIR

#: measured on the shipped model: all 12 of these scenes are drawn with the asked shape and
#: colour at 12 DDIM steps (100 of 100 held-out scenes at 50 steps, docs/testbed.md); the
#: threshold leaves a margin of two
STOCK_FIDELITY_ITEMS = 12
STOCK_FIDELITY_STEPS = 12
STOCK_FIDELITY_MIN = 10


# --- world ---------------------------------------------------------------------------------------

def test_world_is_deterministic_per_seed_and_split():
    a, b = world.render_scene(world.sample_scene(7, "eval")), world.render_scene(world.sample_scene(7, "eval"))
    assert np.array_equal(a.flat, b.flat) and np.array_equal(a.styled, b.styled) and np.array_equal(a.mask, b.mask)
    assert a.scene.caption(True) == b.scene.caption(True)
    other = world.sample_scene(7, "train")
    assert (other.style, other.shape, other.colour, other.center) != (a.scene.style, a.scene.shape, a.scene.colour, a.scene.center)


def test_world_renderings_differ_only_inside_the_mask_and_captions_name_the_style():
    scene = world.sample_scene(3, "eval", style="stripes", shape="star", colour="red")
    r = world.render_scene(scene)
    outside = r.mask == 0
    assert np.array_equal(r.flat[outside], r.styled[outside])
    assert np.array_equal(r.flat[outside], world.render(scene, "background")[outside])
    assert not np.array_equal(r.flat, r.styled)
    assert scene.caption(False) == "a red star" and scene.caption(True) == "a red star in stripes style"
    # the flat object is one colour; the styled one carries the background's texture
    core = world.object_coverage(scene) == 1.0
    assert len(np.unique(r.flat[core].reshape(-1, 3), axis=0)) == 1
    assert r.styled[core].std() > 20


def test_world_covers_every_style_shape_and_colour():
    scenes = [world.sample_scene(i) for i in range(300)]
    assert {s.style for s in scenes} == set(world.STYLES) and len(world.STYLES) >= 6
    assert {s.shape for s in scenes} == set(world.SHAPES) and len(world.SHAPES) >= 4
    assert {s.colour for s in scenes} == set(world.COLOUR_NAMES) and len(world.COLOUR_NAMES) >= 5
    assert all(0.03 < world.masked_fraction(s) < 0.6 for s in scenes[:40])


def test_world_rejects_bad_attributes():
    with pytest.raises(InputError, match="style 'plaid' is not one of"):
        world.sample_scene(0, style="plaid")
    with pytest.raises(InputError, match="split 'test' is not one of"):
        world.sample_scene(0, "test")
    with pytest.raises(InputError, match="non-negative integer"):
        world.sample_scene(-1)


# --- tokenizer -----------------------------------------------------------------------------------

def test_every_vocabulary_word_is_exactly_one_token(tmp_path):
    from harmonpaint_recipe.testbed.models import load_tokenizer
    from harmonpaint_recipe.testbed.vocab import WORDS

    tok = load_tokenizer(tmp_path)
    for word in WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
        assert tok.convert_ids_to_tokens(ids)[1] == word + "</w>"
    ids = tok("a red circle in stripes style").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in "a red circle in stripes style".split()]
    assert len(tok("an unknown word").input_ids) > 5  # unknown words still tokenize, letter by letter


def test_shipped_tokenizer_matches_the_generated_one():
    from harmonpaint_recipe.testbed.tokenizer import tokenizer_vocab

    shipped = json.loads((WEIGHTS_DIR / "tokenizer" / "vocab.json").read_text(encoding="utf-8"))
    assert shipped == tokenizer_vocab()


# --- shipped weights -----------------------------------------------------------------------------

def test_shipped_weights_load_through_from_pretrained_and_the_recipe():
    from diffusers import StableDiffusionInpaintPipeline

    import harmonpaint_recipe as hp
    from attnctl.selectors import select_sites
    from attnctl.sites import describe_sites
    from attnctl.testing import build_tiny_inpaint_pipeline

    files = sorted(p.relative_to(WEIGHTS_DIR).as_posix() for p in WEIGHTS_DIR.rglob("*") if p.is_file())
    assert all(not f.endswith((".bin", ".ckpt", ".pt", ".pth")) for f in files)
    assert sum(p.stat().st_size for p in WEIGHTS_DIR.rglob("*") if p.is_file()) <= 25 * 2**20
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(WEIGHTS_DIR), use_safetensors=True, local_files_only=True)
    assert pipe.unet.config.in_channels == 9 and pipe.vae_scale_factor == 4
    assert tuple(pipe.unet.config.block_out_channels) == tuple(UNET_CONFIG["block_out_channels"])
    recipe = hp.load_recipe("harmonpaint", ["model.pretrained=testbed", "model.device=cpu"])
    loaded = hp.load_pipeline(recipe)
    assert loaded.unet.dtype == torch.float32
    sites = describe_sites(loaded.unet)
    sd15_layout = describe_sites(build_tiny_inpaint_pipeline().unet)  # SD 1.5's site layout
    assert [(s.name, s.kind, s.level) for s in sites] == [(s.name, s.kind, s.level) for s in sd15_layout]
    assert len(sites.of_kind("self")) == 16 and len(sites.of_kind("cross")) == 16
    assert [s.name for s in select_sites("self[-8:]", sites)] == [s.name for s in select_sites("self[-8:]", sd15_layout)]
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight.float())


def test_stock_model_draws_the_asked_object(tmp_path):
    import harmonpaint_recipe as hp
    from harmonpaint_recipe.testbed.judges import FidelityJudge
    from harmonpaint_recipe.testbed.samples import write_samples

    records = write_samples(tmp_path, count=STOCK_FIDELITY_ITEMS, split="eval", mask_kind="box")
    recipe = hp.load_recipe("sdi", ["model.pretrained=testbed", "model.device=cpu", f"sampler.steps={STOCK_FIDELITY_STEPS}"])
    pipe = hp.load_pipeline(recipe)
    pipe.set_progress_bar_config(disable=True)
    judge = FidelityJudge.load(WEIGHTS_DIR / "judges" / "fidelity.safetensors")
    hits = 0
    for rec in records:
        out = hp.inpaint(tmp_path / rec["image"], tmp_path / rec["mask"], rec["prompt"], recipe=recipe, pipe=pipe, seed=0)
        mask = np.asarray(Image.open(tmp_path / rec["mask"])) > 127
        hits += judge.predict(np.asarray(out)[None], mask[None])[0] == (rec["shape"], rec["colour"])
    assert hits >= STOCK_FIDELITY_MIN


# --- judges --------------------------------------------------------------------------------------

def test_fidelity_judge_names_ground_truth_objects_flat_and_styled():
    from harmonpaint_recipe.testbed.judges import FidelityJudge

    judge = FidelityJudge.load(WEIGHTS_DIR / "judges" / "fidelity.safetensors")
    rendered = [world.render_scene(world.sample_scene(i, "eval")) for i in range(40)]
    masks = np.stack([r.mask > 0 for r in rendered])
    truth = [(r.scene.shape, r.scene.colour) for r in rendered]
    for kind in ("flat", "styled"):
        seen = judge.predict(np.stack([getattr(r, kind) for r in rendered]), masks)
        assert np.mean([a == b for a, b in zip(seen, truth)]) >= 0.9, kind
    blank = judge.predict(np.stack([world.render(r.scene, "background") for r in rendered[:10]]), masks[:10])
    assert sum(shape == "none" for shape, _ in blank) >= 8


# --- commands ------------------------------------------------------------------------------------

def test_render_writes_an_inpaint_manifest_and_a_grid(tmp_path, capsys):
    assert main(["testbed", "render", str(tmp_path / "w"), "--count", "3", "--grid", str(tmp_path / "g.png")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "w" / "items.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == ["demo-0000", "demo-0001", "demo-0002"]
    assert lines[0]["prompt"] == f"a {lines[0]['colour']} {lines[0]['shape']}"
    batch = [json.loads(x) for x in (tmp_path / "w" / "inpaint.jsonl").read_text().splitlines()]
    assert batch[0] == {"name": "demo-0000", "image": lines[0]["image"], "mask": lines[0]["mask"], "prompt": lines[0]["prompt"],
                        "seed": 0}
    assert Image.open(tmp_path / "w" / lines[0]["image"]).size == (64, 64)
    assert Image.open(tmp_path / "g.png").size[0] == 3 * 128
    assert main(["testbed", "render", str(tmp_path / "x"), "--count", "0"]) == 2
    assert "--count must be at least 1" in capsys.readouterr().err


def test_eval_refuses_bad_settings(tmp_path, capsys):
    assert main(["testbed", "eval", "--out", str(tmp_path), "--items", "1"]) == 2
    assert "--items must be at least 2" in capsys.readouterr().err
    assert main(["testbed", "eval", "--out", str(tmp_path), "--model", str(tmp_path)]) == 2
    assert "is not a pipeline folder" in capsys.readouterr().err


def test_bootstrap_intervals_are_paired_and_contain_the_mean():
    from harmonpaint_recipe.testbed.report import summarize_rows

    ids = [f"i{k}" for k in range(20)]
    rng = np.random.default_rng(0)
    rows = []
    for k, i in enumerate(ids):
        base = float(rng.random())
        for m, shift in (("none", 0.0), ("full", -0.1)):
            rows.append({"method": m, "id": i, "fidelity": float(k % 2), "shape_ok": 1.0, "colour_ok": 1.0,
                         "harmony": base + shift})
    stats = summarize_rows(rows, ["none", "full"], ids, bootstrap=500)
    mean, lo, hi = stats["none"]["harmony"]
    assert lo <= mean <= hi and hi - lo > 0.05
    assert stats["full"]["delta_harmony"] == pytest.approx((-0.1, -0.1, -0.1))  # paired: no spread
    assert stats["none"]["fidelity"][0] == 0.5


def test_min_snr_weighting_keeps_noisy_steps_and_damps_clean_ones():
    from harmonpaint_recipe.testbed.train import _unet_loss

    pred, noise = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    alpha_bar = torch.tensor([0.01, 0.99])  # SNR 0.0101 (noisy) and 99 (almost clean)
    assert _unet_loss(pred, noise, alpha_bar, None) == pytest.approx(1.0)
    # gamma 5: the noisy sample keeps weight 1, the clean one gets 5/99
    assert _unet_loss(pred, noise, alpha_bar, 5.0) == pytest.approx((1 + 5 / 99) / 2)


def test_loss_plot_draws_a_continued_run_after_its_predecessor(tmp_path):
    from harmonpaint_recipe.testbed.train import _stage_segments, loss_plot

    first = {"settings": {"snr_gamma": None}, "judges": {"fidelity": {"losses": [[1, 1.0]], "steps": 1}},
             "vae": {"losses": [[1, 0.5]], "steps": 1}, "unet": {"losses": [[1, 0.2], [2, 0.1]], "steps": 2}}
    second = {"settings": {"snr_gamma": 5.0}, "init_from": {"folder": "a", "report": first},
              "judges": first["judges"], "vae": {"loaded": "b/vae"}, "unet": {"losses": [[1, 0.05]], "steps": 1}}
    assert [label for label, _ in _stage_segments(second, "unet")] == ["MSE", "min-SNR-5 weighted"]
    assert len(_stage_segments(second, "judges")) == 1  # skipped stages are not drawn twice
    pytest.importorskip("matplotlib")
    assert loss_plot(second, tmp_path / "l.png") and Image.open(tmp_path / "l.png").size[0] > 0


@pytest.mark.slow
def test_training_runs_every_stage_and_writes_a_loadable_pipeline(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    from harmonpaint_recipe.testbed.settings import TrainSettings
    from harmonpaint_recipe.testbed.train import train_testbed

    settings = TrainSettings(
        out_dir=tmp_path / "m", judge_steps=2, harmony_steps=2, judge_scenes=24, judge_batch=8, harmony_batch=8,
        vae_steps=2, vae_batch=4,
        unet_steps=2, unet_batch=4, cache_scenes=8, calibration_scenes=12, log_every=1,
    )
    report = train_testbed(settings)
    assert report["unet"]["steps"] == 2 and report["vae"]["steps"] == 2
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(tmp_path / "m"), use_safetensors=True, local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(1 / report["vae"]["latent_std"])
    assert (tmp_path / "m" / "judges" / "fidelity.safetensors").is_file()
    from harmonpaint_recipe.testbed.harmony import HarmonyJudge

    HarmonyJudge.load(tmp_path / "m" / "judges" / "harmony.safetensors")  # a judge of this version
    # a second run finds every stage done and only rewrites the pipeline files
    again = train_testbed(settings)
    assert again["unet"]["steps"] == 2
