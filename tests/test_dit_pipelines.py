"""Whole transformer pipelines (tiny SD3 inpainting, tiny FLUX Fill): idle identity, recipes, guided latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnctl
from attnctl import BatchLayout, StrategyManager
from attnctl.testing import build_tiny_dit_pipeline
from harmonpaint_recipe.inputs import PreparedInputs
from attnctl.layout import pipeline_token_indices
from harmonpaint_recipe.loading import load_recipe, resolved
from harmonpaint_recipe.runner import Runner, attach_config
from toy_strategies import FactoryPlugin, ShiftLatents

KINDS = ("sd3", "flux-fill")
GUIDANCE = {"sd3": 5.0, "flux-fill": 30.0}
RECIPE = {"sd3": "harmonpaint-sd3", "flux-fill": "harmonpaint-flux-fill"}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8))
    mask = np.zeros((64, 96), np.uint8)
    mask[16:48, 20:60] = 255
    return image, Image.fromarray(mask)


def call(pipe, kind, images, steps=3, strength=1.0, **extra):
    """One seeded call at 64x96 (SD3 inpainting's own default strength is 0.6: 1.0 unless given)."""
    image, mask = images
    return pipe(prompt="a red cup", image=image, mask_image=mask, height=64, width=96, num_inference_steps=steps,
                guidance_scale=GUIDANCE[kind], strength=strength, generator=torch.Generator().manual_seed(0),
                output_type="np", max_sequence_length=32, **extra).images


def recorded_calls(pipe):
    """Every transformer output of the calls made while the returned list is being filled."""
    outputs = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, out: outputs.append(out[0].clone()))
    return outputs, hook


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_idle_attach_is_bit_identical_every_call(kind, strength, images):
    pipe = build_tiny_dit_pipeline(kind)
    stock_calls, hook = recorded_calls(pipe)
    stock = call(pipe, kind, images, strength=strength)
    hook.remove()
    layout = BatchLayout.for_call(pipe, prompt="a red cup", guidance_scale=GUIDANCE[kind])
    assert len(layout) == (2 if kind == "sd3" else 1)  # SD3: batched CFG; FLUX: guidance-distilled, one row
    mask = torch.from_numpy(np.asarray(images[1]) / 255.0)
    with attnctl.attach(pipe, {}, manager=StrategyManager(autoload=False)) as ctl, ctl.run(layout, mask=mask):
        attached_calls, hook = recorded_calls(pipe)
        attached = call(pipe, kind, images, strength=strength)
        hook.remove()
    assert np.array_equal(stock, attached)
    assert len(stock_calls) == len(attached_calls) > 0
    assert all(torch.equal(a, b) for a, b in zip(stock_calls, attached_calls))


def prepared(images) -> PreparedInputs:
    image, mask = images
    return PreparedInputs(image=image, mask=mask, mask_array=(np.asarray(mask) > 127).astype(np.float32), notes=[])


@pytest.mark.parametrize("kind", KINDS)
def test_recipe_acts_by_phase_on_sigma(kind, images):
    """The recipe's strategies act where and when they say: SAMS while sigma >= eta, MAKVS after."""
    pipe = build_tiny_dit_pipeline(kind)
    recipe = load_recipe(RECIPE[kind], ["sampler.steps=6"])
    seen = []
    with Runner(pipe, recipe) as runner:
        hook = pipe.transformer.register_forward_pre_hook(
            lambda m, a: seen.append((runner.controller.state.t_norm, sorted(
                {op.strategy for ops in runner.controller.state.active.values() for op in ops.all}))))
        result = runner(prepared(images), "a red cup", seed=1)
        hook.remove()
    assert len(seen) == 6
    for sigma, acting in seen:
        assert acting == (["sams"] if sigma >= 0.7 else ["makvs"]), (sigma, acting)
    assert {s for s, _ in seen if s >= 0.7} and {s for s, _ in seen if s < 0.7}  # both phases happen
    plain = call(pipe, kind, images, steps=6)
    assert np.abs(np.asarray(result.image, dtype=np.float64) / 255 - plain[0]).max() > 1e-2  # the control


@pytest.mark.parametrize("kind", KINDS)
def test_a_guided_latent_is_what_the_step_continues_from(kind, images):
    """z + 0.1 at step 1 equals the stock pipeline with 0.1 added to its latents after step 0 (bit for bit)."""
    pipe = build_tiny_dit_pipeline(kind)

    def add_after_first_step(p, step, t, kwargs):
        if step == 0:
            kwargs["latents"] = kwargs["latents"] + 0.1
        return kwargs

    stock = call(pipe, kind, images, callback_on_step_end=add_after_first_step)
    ops = []

    def make(instance, sites):
        ops.append(ShiftLatents(instance, amount=0.1, gates=(lambda state: state.step_index == 1,)))
        return ops

    manager = StrategyManager(plugins=[FactoryPlugin(make)], autoload=False)
    layout = BatchLayout.for_call(pipe, prompt="a red cup", guidance_scale=GUIDANCE[kind])
    mask = torch.from_numpy(np.asarray(images[1]) / 255.0)
    with attnctl.attach(pipe, {"strategies": {"shift": {"strategy": "toy_ops"}}}, manager=manager) as ctl:
        with ctl.run(layout, mask=mask):
            guided = call(pipe, kind, images)
    assert [step for step, _ in ops[0].seen] == [1]
    assert ops[0].seen[0][1].shape == (1, pipe.vae.config.latent_channels, 32, 48)  # [B, C, H, W], unpacked
    assert np.array_equal(guided, stock)
    assert not np.array_equal(guided, call(pipe, kind, images))  # the control: the shift matters


@pytest.mark.parametrize("kind", KINDS)
def test_steer_loss_guides_from_joint_maps(kind, images):
    """Latent guidance reads img>txt maps at joint sites, lowers the loss it computes and changes the image."""
    pipe = build_tiny_dit_pipeline(kind)
    recipe = load_recipe(RECIPE[kind], ["strategies.steer.enabled=true", "strategies.steer.read_sites=joint",
                                        "strategies.steer.record_loss_after=true", "strategies.makvs.enabled=false",
                                        "strategies.sams.enabled=false"])
    layout = BatchLayout.for_call(pipe, prompt="a red cup", guidance_scale=GUIDANCE[kind])
    tokens = [pipeline_token_indices(pipe, "a red cup")]
    mask = torch.from_numpy(np.asarray(images[1]) / 255.0)
    with attnctl.attach(pipe, attach_config(resolved(recipe))) as ctl:
        with ctl.run(layout, mask=mask, token_indices=tokens) as state:
            guided = call(pipe, kind, images, steps=4)
    history = state.scratch["steer"]["history"]
    assert {h["step"] for h in history} == {0, 1}  # sigma >= 0.7: the first two of four steps
    assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in history)
    assert all(h["loss_after"] < h["loss"] for h in history)
    assert np.abs(guided - call(pipe, kind, images, steps=4)).max() > 1e-3  # the control: guidance moved the image


@pytest.mark.parametrize("kind", KINDS)
def test_cross_map_probe_reads_the_img_txt_block_renormalized_over_the_text(kind, images):
    """The probe's maps at joint sites against the explicit joint softmax of the call: A[img, txt] / A[img, txt].sum."""
    from reference_joint import RecordJointProbs

    pipe = build_tiny_dit_pipeline(kind)
    positions = [1, 2, 3]  # FLUX's T5 text has no start token: position p is its token p - 1
    config = {"probes": {"maps": {"strategy": "cross_maps", "enabled": True, "sites": "joint", "steps": "all",
                                  "tokens": positions}}}
    layout = BatchLayout.for_call(pipe, prompt="a red cup", guidance_scale=GUIDANCE[kind])
    mask = torch.from_numpy(np.asarray(images[1]) / 255.0)
    with attnctl.attach(pipe, config) as ctl, ctl.run(layout, mask=mask) as state:
        call(pipe, kind, images, steps=1)
    with RecordJointProbs() as recorded:  # the stock call: a probe changes nothing, so q and k are these
        call(pipe, kind, images, steps=1)
    maps = state.results["maps"].maps[(0, 1)][0]  # step 0, level 1 (2x2 patches), image 0
    sites = [s for s in ctl.sites if s.kind == "joint"]
    text, cond = (77 + 32, 1) if kind == "sd3" else (32, 0)  # the text tokens; the row conditioned on the prompt
    # the transformer's calls over text + image tokens, in order (FLUX's single sites come after its joint ones)
    joint_calls = [p for p in recorded.probs if p.shape[-1] == text + 16 * 24][: len(sites)]
    assert len(joint_calls) == len(sites)
    columns = [p if kind == "sd3" else p - 1 for p in positions]
    expected = 0
    for probs in joint_calls:
        img, txt = (slice(0, 384), slice(384, 384 + text)) if kind == "sd3" else (slice(text, None), slice(0, text))
        block = probs[cond, :, img, txt]
        expected = expected + (block[..., columns] / block.sum(-1, keepdim=True)).mean(0)
    expected = (expected / len(joint_calls)).T.reshape(len(positions), 16, 24)
    assert np.abs(maps - expected.numpy()).max() < 1e-5
    assert np.abs(maps - probs_without_renormalizing(joint_calls, img, txt, cond, columns)).max() > 1e-3  # control


def probs_without_renormalizing(calls, img, txt, cond, columns):
    raw = sum(p[cond, :, img, txt][..., columns].mean(0) for p in calls) / len(calls)
    return raw.T.reshape(len(columns), 16, 24).numpy()


@pytest.fixture
def files(tmp_path, images):
    images[0].save(tmp_path / "img.png")
    images[1].save(tmp_path / "mask.png")
    return tmp_path


@pytest.mark.parametrize("kind", KINDS)
def test_commands_run_offline_on_the_tiny_transformers(kind, files, capsys):
    """attnctl sites, inpaint and probe on tiny-sd3 / tiny-flux-fill, as docs/transformers.md shows them."""
    import json

    from attnctl.cli import main

    model = f"tiny-{kind}"
    assert main(["sites", model]) == 0
    table = capsys.readouterr().out
    assert "transformer_blocks.1.attn" in table and "img>img img>txt txt>img txt>txt" in table
    assert ("single[1]" in table) == (kind == "flux-fill") and ("self[0]" in table) == (kind == "sd3")
    out = files / "out.png"
    assert main(["inpaint", "--recipe", RECIPE[kind], "--image", str(files / "img.png"), "--mask",
                 str(files / "mask.png"), "--prompt", "a red cup", "--out", str(out), "--seed", "1",
                 f"model.pretrained={model}", "sampler.steps=4"]) == 0
    assert Image.open(out).size == (96, 64)
    assert main(["probe", "--recipe", RECIPE[kind], "--image", str(files / "img.png"), "--mask",
                 str(files / "mask.png"), "--prompt", "a red cup", "--out-dir", str(files / "probe"), "--seed", "1",
                 f"model.pretrained={model}", "sampler.steps=4"]) == 0
    record = json.loads((files / "probe" / "probes.json").read_text())
    text = json.dumps(record)
    assert "background_share" in text and "object_share" in text


def test_steps_are_counted_by_the_scheduler_not_by_bf16_rounded_timesteps(images):
    """FLUX hands its transformer t / 1000 in the latent dtype: in bf16 the value comes back rounded,
    yet every call gets its step index and the schedule's own timestep."""
    pipe = build_tiny_dit_pipeline("flux-fill").to(torch.bfloat16)
    seen = []
    layout = BatchLayout.for_call(pipe, prompt="a red cup", guidance_scale=30.0)
    with attnctl.attach(pipe, {}) as ctl, ctl.run(layout, mask=torch.ones(64, 96)) as state:
        hook = pipe.transformer.register_forward_pre_hook(
            lambda m, a, k: seen.append((state.step_index, state.timestep, float(k["timestep"][0]) * 1000)),
            with_kwargs=True)
        call(pipe, "flux-fill", images, steps=5)
        hook.remove()
    schedule = [float(t) for t in pipe.scheduler.timesteps]
    assert [index for index, _, _ in seen] == [0, 1, 2, 3, 4]
    assert [t for _, t, _ in seen] == schedule
    assert any(abs(given - t) > 0.5 for _, t, given in seen)  # what value matching would have missed


def test_phase_gates_on_the_step_fraction(images):
    """timestep_gate on: step bounds 1 - k/N, not FLUX's shifted sigmas: k = 0..5 of 10 have at least half to come."""
    pipe = build_tiny_dit_pipeline("flux-fill")
    recipe = load_recipe("harmonpaint-flux-fill", ["sampler.steps=10", "eta=0.5", "strategies.phases.on=step"])
    seen = []
    with Runner(pipe, recipe) as runner:
        hook = pipe.transformer.register_forward_pre_hook(lambda m, a: seen.append(sorted(
            {op.strategy for ops in runner.controller.state.active.values() for op in ops.all})))
        runner(prepared(images), "a red cup", seed=1)
        hook.remove()
    assert seen == [["sams"]] * 6 + [["makvs"]] * 4


def test_observed_text_maps_are_the_img_txt_block_renormalized_over_the_text(images):
    """The explicit-map path latent guidance reads (an observe op, ``call.text_probs``) against the stock
    call's explicit joint softmax: FLUX's zero column 0 included."""
    from dataclasses import dataclass

    from attnctl.ops import MAIN, ObserveOp
    from reference_joint import RecordJointProbs

    @dataclass(eq=False)
    class KeepTextMaps(ObserveOp):
        joint_sites = True

        def observe(self, call, probs):
            call.state.scratch_for(self.strategy).setdefault("maps", []).append(call.text_probs(probs).double())

    def make(instance, sites):
        return [KeepTextMaps(instance, site=s, passes=frozenset({MAIN})) for s in sites if s.kind == "joint"]

    pipe = build_tiny_dit_pipeline("flux-fill")
    manager = StrategyManager(plugins=[FactoryPlugin(make)], autoload=False)
    layout = BatchLayout.for_call(pipe, prompt="a red cup", guidance_scale=30.0)
    with attnctl.attach(pipe, {"strategies": {"keep": {"strategy": "toy_ops"}}}, manager=manager) as ctl:
        with ctl.run(layout, mask=torch.ones(64, 96)) as state:
            call(pipe, "flux-fill", images, steps=1)
    with RecordJointProbs() as recorded:
        call(pipe, "flux-fill", images, steps=1)
    stock = [p for p in recorded.probs if p.shape[-1] == 32 + 16 * 24][:2]  # the two joint sites' calls
    observed = state.scratch["keep"]["maps"]
    assert len(observed) == len(stock) == 2
    for maps, probs in zip(observed, stock):
        block = probs[:, :, 32:, :32]  # image queries, text keys ([txt, img] order)
        expected = torch.nn.functional.pad(block / block.sum(-1, keepdim=True), (1, 0))
        assert (maps - expected).abs().max() < 1e-5
        assert maps[..., 0].abs().max() == 0 and (maps.sum(-1) - 1).abs().max() < 1e-5


def test_the_app_runs_the_transformer_recipes_and_offers_only_its_family(tmp_path, images):
    from harmonpaint_recipe.app.editor import editor_inputs
    from harmonpaint_recipe.app.service import AppService, RunRequest

    photo = images[0].convert("RGBA")
    layer = Image.new("RGBA", photo.size, (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (16, 16, 48, 48))
    service = AppService("harmonpaint-flux-fill", ["model.pretrained=tiny-flux-fill", "sampler.steps=2"], tmp_path,
                         pipe=build_tiny_dit_pipeline("flux-fill"))
    assert service.recipe_choices == ["harmonpaint-flux-fill"]  # no UNet recipe is offered for FLUX Fill
    assert "FluxFillPipeline" in service.model_label
    out = service.run(RunRequest(editor_inputs({"background": photo, "layers": [layer]}), "a red cup", 3,
                                 "harmonpaint-flux-fill"))
    assert len(out.outputs) == 2 and all(Path(o.image_path).is_file() for o in out.outputs)  # stock and recipe


def test_image_sides_the_transformer_cannot_take_are_refused_with_the_fix():
    """The tiny models' VAE factor 2 times the patch (or FLUX's packing) 2: sides must be multiples of 4."""
    from attnctl.errors import InputError
    from harmonpaint_recipe.runner import _check_size

    for kind in KINDS:
        pipe = build_tiny_dit_pipeline(kind)
        _check_size(pipe, 64, 96)
        with pytest.raises(InputError, match=r"image is 66x64, but \w+ needs .*multiples of 4; .*e\.g\. to 64x64"):
            _check_size(pipe, 66, 64)
