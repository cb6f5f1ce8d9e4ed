"""Probes: the probes section (off unless enabled, read-only, one namespace with strategies),
the built-in probes' numbers against explicit references, streaming over steps, the runner's
``RunResult.probes``, the Python API, and a third-party probe plugin."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import attnctl
from attnctl import BatchLayout, MeasureOp, StrategyManager, StrategySpec, select_sites
from attnctl.errors import ConfigError
from attnctl.planning import compile_plan
from attnctl.testing import build_tiny_inpaint_pipeline
from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.runner import Runner
from probe_helpers import one_unet_step as _one_step
from reference_attention import single_thread
from strategies._probe_common import StepChoice, StepSums
from strategies.probe_cross_maps import CrossMaps
from strategies.probe_curves import Curves
from strategies.probe_self_pca import SelfPca, top_components

_one_thread = pytest.fixture(autouse=True)(single_thread)
TINY = ["model.pretrained=tiny"]
ALL_PROBES = ["probes.cross_maps.enabled=true", "probes.self_pca.enabled=true", "probes.curves.enabled=true"]


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_inpaint_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------ the probes section
def test_probes_are_off_unless_enabled_and_only_measure(pipe):
    sites = attnctl.describe_sites(pipe.unet)
    manager = StrategyManager.default()
    off = compile_plan({"probes": {"cross_maps": {}, "curves": {"steps": "all"}}}, sites, manager)
    assert off.is_idle and off.probes == frozenset()
    on = compile_plan({"probes": {"cross_maps": {"enabled": True}}}, sites, manager)
    ops = [op for site_ops in on.site_ops.values() for op in site_ops]
    assert on.probes == {"cross_maps"} and ops and all(isinstance(op, MeasureOp) for op in ops)
    assert all(op.passes == {"main"} for op in ops)  # probes read the run the user gets
    assert {op.site.key for op in ops} == {s.key for s in select_sites("cross/4,cross/2", sites)}


def test_probe_and_strategy_names_are_one_namespace(pipe):
    config = {"strategies": {"x": {"strategy": "region_mask"}}, "probes": {"x": {"strategy": "curves", "enabled": True}}}
    with pytest.raises(ConfigError, match=r"probes\.x: the name 'x' is also an instance under strategies"):
        compile_plan(config, attnctl.describe_sites(pipe.unet), StrategyManager.default())


def test_a_probe_that_changes_the_run_is_refused(pipe):
    config = {"probes": {"sams": {"strategy": "region_mask", "enabled": True}}}
    with pytest.raises(ConfigError, match=r"probes\.sams: strategy 'region_mask' plans a RegionMaskOp, which changes "
                                          r"the run.*put it under strategies"):
        compile_plan(config, attnctl.describe_sites(pipe.unet), StrategyManager.default())


@pytest.mark.parametrize("override,message", [
    ("probes.cross_maps.stepz=3", r"unknown parameter 'probes\.cross_maps\.stepz'.*did you mean 'steps'"),
    ("probes.cross_maps.steps=spread:0", r"probes\.cross_maps: steps: expected 'all', 'spread:N' \(N >= 1\)"),
    ("probes.curves.enabled=maybe", r"probes\.curves\.enabled: expected true or false"),
    ("probes.pca.enabled=true", r"unknown strategy 'pca' in probes\.pca"),
    ("probes.curves.tokens=[0]", r"probes\.curves: tokens: positions start at 1"),
])
def test_recipe_probe_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe("harmonpaint", [override])


def test_declared_but_disabled_probes_leave_the_attach_idle(pipe):
    recipe = load_recipe("sdi", TINY)
    assert set(recipe.probes) == {"cross_maps", "self_pca", "curves"}  # declared by the shipped recipes
    with Runner(pipe, recipe) as runner:
        assert runner.controller.plan.is_idle  # bit-identical to stock: tests/test_runner_sd.py


def test_step_choice():
    assert StepChoice.parse("spread:5").resolve(50) == {0, 12, 24, 37, 49}
    assert StepChoice.parse("spread:9").resolve(4) == {0, 1, 2, 3}
    assert StepChoice.parse([0, -1, 7]).resolve(5) == {0, 4}  # 7 is past a 5-step run
    assert StepChoice.parse("all").resolve(10) is None
    for bad in ("every", "spread:x", [], [1.5]):
        with pytest.raises(ConfigError):
            StepChoice.parse(bad)


def test_step_sums_keep_one_step_at_a_time():
    finished = []
    sums = StepSums(lambda step, s: finished.append((step, {k: (v.item(), n) for k, (v, n) in s.items()})))
    sums.add((0, 900.0), "a", torch.tensor(1.0))
    sums.add((0, 900.0), "a", torch.tensor(2.0))
    assert finished == []
    sums.add((1, 800.0), "a", torch.tensor(5.0))  # a new step finishes the previous one and drops its sums
    assert finished == [((0, 900.0), {"a": (3.0, 2)})] and list(sums._sums) == ["a"]
    sums.flush()
    assert finished[-1] == ((1, 800.0), {"a": (5.0, 1)})


def test_top_components_match_the_svd_and_leave_the_global_rng_alone(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(300, 300, generator=g) * 3, dim=-1)
    state = torch.random.get_rng_state()
    exact, shares = top_components(x)
    monkeypatch.setattr("strategies.probe_self_pca.EXACT_LIMIT", 10)  # the subspace-iteration path
    iterated, shares_it = top_components(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    centred = (x - x.mean(0)).double().numpy()
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    reference = u[:, :3] * s[:3]
    for scores in (exact, iterated):
        for c in range(3):  # equal up to the sign convention (positive third moment)
            assert np.allclose(np.abs(scores[:, c].numpy()), np.abs(reference[:, c]), atol=1e-4)
            assert (scores[:, c] ** 3).sum() > 0
    assert torch.allclose(shares, torch.tensor(s[:3] ** 2 / (s**2).sum(), dtype=torch.float32), atol=1e-5)
    assert torch.allclose(shares, shares_it, atol=1e-4)


# ------------------------------------------------------------------ numbers against references
def test_cross_maps_equal_the_explicit_token_maps(pipe):
    record = {}
    maps = _one_step(pipe, {"probes": {"cross_maps": {"enabled": True, "steps": "all"}}}, record)["cross_maps"]
    assert isinstance(maps, CrossMaps) and maps.tokens == {0: [1, 2, 3]}
    for level, keys in maps.sites.items():
        explicit = []
        for key in keys:
            q, k, scale, _ = record[key]
            probs = torch.softmax(q[1].double() @ k[1].double().transpose(-1, -2) * scale, dim=-1)  # cond row
            explicit.append(probs.mean(0)[:, [1, 2, 3]])  # heads averaged, the three tokens
        reference = (sum(explicit) / len(explicit)).T.reshape(3, *maps.grids[level]).numpy()
        (step, _), = maps.steps
        assert np.abs(maps.maps[(step, level)][0] - reference).max() <= 1e-6


def test_curves_record_shares_that_sum_to_one_and_the_object_mass(pipe):
    record = {}
    config = {"strategies": {"kv": {"strategy": "kv_bank", "sites": "self[-2:]"}},
              "probes": {"curves": {"enabled": True, "cross_sites": "cross[0]"}}}
    curves = _one_step(pipe, config, record)["curves"]
    assert isinstance(curves, Curves) and curves.groups == {"reweighted": [], "extended": ["self[14]", "self[15]"]}
    for site in ("self[0]", "self[15]"):
        own_bg, bank = curves.series["background_share"][site][0][0], curves.series["bank_share"][site][0][0]
        assert (bank > 0.05) == (site == "self[15]")  # keys appended only where kv_bank acts
        assert curves.series["row_mass"][site][0][0] == pytest.approx(1.0, abs=1e-6)
        assert 0 < own_bg < 1 - bank
    q, k, scale, mask = record["cross[0]"]
    probs = torch.softmax(q[1].double() @ k[1].double().transpose(-1, -2) * scale, dim=-1).mean(0)
    inside = mask[1] > 0.5
    expected = probs[inside][:, [1, 2, 3]].sum(-1).mean().item()
    assert curves.series["object_mass"]["cross[0]"][0][0] == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------ through the runner
def _inputs(size=64):
    rng = np.random.RandomState(0)
    from PIL import Image

    image = Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))
    mask = np.zeros((size, size), np.uint8)
    mask[16:48, 20:52] = 255
    return prepare_inputs(image, Image.fromarray(mask))


def test_probes_keep_the_chosen_steps_and_leave_other_steps_fused(pipe, monkeypatch):
    import attnctl.adapters as adapters

    seen: list[tuple[int, str, bool, bool]] = []
    original = adapters.compute

    def counting(call, ops):
        seen.append((call.state.step_index, call.site.key, bool(ops.measure), bool(ops.observe)))
        return original(call, ops)

    monkeypatch.setattr(adapters, "compute", counting)
    recipe = load_recipe("sdi", TINY + ["sampler.steps=4", *ALL_PROBES, "probes.cross_maps.steps=[0, -1]",
                                        "probes.self_pca.steps=[1]", "probes.curves.steps=spread:2"])
    with Runner(pipe, recipe) as runner:
        result = runner(_inputs(), "a small owl", seed=0)
    assert sorted(result.probes) == ["cross_maps", "curves", "self_pca"]
    assert [s for s, _ in result.probes["cross_maps"].steps] == [0, 3]
    assert [s for s, _ in result.probes["self_pca"].steps] == [1]
    assert [s for s, _ in result.probes["curves"].steps] == [0, 3]
    assert {s for s, *_ in seen} == {0, 1, 3}  # step 2: no probe reads, every site runs its own processor
    assert {s for s, _, _, observe in seen if observe} == {1}  # the explicit map only where PCA reads
    pca = result.probes["self_pca"]
    (level,) = pca.grids
    assert pca.rgb[(1, level)][0].shape == (*pca.grids[level], 3)


def test_probes_do_not_change_the_image(pipe):
    for name in ("harmonpaint", "sdi"):
        latents = []
        for extra in ([], ALL_PROBES):
            recipe = load_recipe(name, TINY + ["sampler.steps=3", *extra])
            with Runner(pipe, recipe) as runner:
                latents.append(runner(_inputs(), "a small owl", seed=0, pipeline_kwargs={"output_type": "latent"}).image)
        assert (latents[0] - latents[1]).abs().max() <= 1e-5 * latents[0].abs().max(), name  # float rounding only


def test_probe_api_returns_arrays_pictures_and_numbers(pipe):
    import harmonpaint_recipe as hp

    inputs = _inputs()
    run = hp.probe(inputs.image, inputs.mask, "a small owl", recipe=load_recipe("harmonpaint", TINY + ["sampler.steps=3"]),
                   probes=["cross_maps", "self_pca", "curves"], pipe=pipe, seed=3)
    assert run.seed == 3 and run.image.size == (64, 64)
    maps, pca, curves = run.results["cross_maps"], run.results["self_pca"], run.results["curves"]
    assert isinstance(maps, CrossMaps) and isinstance(pca, SelfPca) and isinstance(curves, Curves)
    tokens = maps.tokens[0]
    assert [run.token_labels[p] for p in tokens] and all(a.shape[0] == len(tokens) for m in maps.maps.values()
                                                         for a in m.values())
    assert len(curves.curve("background_share")) == 3 and len(curves.guidance["steer"]) == 1  # t = 667, 334, 1: t/T >= 0.6 once
    pictures = run.pictures()
    assert set(pictures) == {"cross_maps", "self_pca", "curves"} and all(p.mode == "RGB" for p in pictures.values())
    record = json.loads(json.dumps(run.record()))  # every number, JSON-ready
    assert record["probes"]["curves"]["guidance"]["steer"][0]["alpha"] == pytest.approx(20.0)


# ------------------------------------------------------------------ a third-party probe
@dataclass
class RowMassParams:
    sites: str = field(default="self[0]", metadata={"help": "sites"})


@dataclass
class RowMass:
    values: list


@dataclass(eq=False)
class RowMassOp(MeasureOp):
    def columns(self, call):
        return call.query.new_ones(1, 1, 1, 1)  # one column: the row sums of W_eff

    def measure(self, call, sums, output):
        call.state.scratch_for(self.strategy).setdefault("values", []).append(float(sums.mean()))


class RowMassProbe:
    @attnctl.hookimpl
    def attnctl_add_strategies(self):
        return [StrategySpec("row_mass", "toy probe: mean row sum of the effective weights", RowMassParams)]

    @attnctl.hookimpl
    def attnctl_plan(self, instance, spec, params, sites):
        if spec.name != "row_mass":
            return None
        return [RowMassOp(instance, site=s) for s in select_sites(params.sites, sites)]

    @attnctl.hookimpl
    def attnctl_run_end(self, state, plan):
        for name, (spec, _) in plan.instances.items():
            if spec.name == "row_mass":
                state.publish(name, RowMass(state.scratch_for(name).get("values", [])))


def test_a_third_party_probe_is_a_plugin_too(pipe):
    from harmonpaint_recipe.probing.record import result_record

    manager = StrategyManager(plugins=[RowMassProbe()])
    recipe = load_recipe("sdi", TINY + ["sampler.steps=2", "probes.mass={strategy: row_mass, enabled: true}"],
                         manager=manager)
    with Runner(pipe, recipe, manager=manager) as runner:
        result = runner(_inputs(), "a small owl", seed=0)
    # one measurement per step (both CFG rows are one attention call); rows of an unreweighted map sum to 1
    assert result_record(result.probes["mass"]) == {"values": [pytest.approx(1.0, abs=1e-6)] * 2}
