"""timestep_gate: windows on t / T_train, for any scheduler and step count."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from PIL import Image

import attnctl
from attnctl import BatchLayout, ConfigError, ReweightOp, StrategySpec, describe_sites
from attnctl.run_state import RunState
from attnctl.testing import SD_DDIM_SCHEDULER_CONFIG, build_tiny_inpaint_pipeline
from strategies import timestep_gate


@dataclass
class ProbeParams:
    note: str = field(default="", metadata={"help": "unused"})


@dataclass(eq=False)
class RecordStep(ReweightOp):
    """Identity reweighting (W = 1 1^T) that records the step index of every call it is active in."""

    seen: list = field(default_factory=list, kw_only=True)

    def factors(self, call):
        self.seen.append(call.state.step_index)
        one = call.query.new_ones(1, 1, 1, 1)
        return [(one, one)]


class ProbePlugin:
    """A toy strategy ``probe`` acting at self[0] in the main pass."""

    def __init__(self):
        self.seen: list[int] = []

    @attnctl.hookimpl
    def attnctl_add_strategies(self):
        return [StrategySpec("probe", "records the steps it is active in", ProbeParams)]

    @attnctl.hookimpl
    def attnctl_plan(self, instance, spec, params, sites):
        if spec.name != "probe":
            return None
        return [RecordStep(instance, site=sites.of_kind("self")[0], passes=frozenset({"main"}), seen=self.seen)]


def _plan(config, probe=None):
    probe = probe or ProbePlugin()
    manager = attnctl.StrategyManager(plugins=[timestep_gate, probe], autoload=False)
    sites = describe_sites(build_tiny_inpaint_pipeline(0).unet)
    return attnctl.compile_plan(config, sites, manager), sites


def _config(rules, probe_enabled=True, **extra):
    return {"strategies": {"probe": {"enabled": probe_enabled}, "phases": {"strategy": "timestep_gate", "rules": rules}, **extra}}


def _active_steps(plan, sites, timesteps):
    """Step indices where probe's op is active, driving RunState.begin_step directly."""
    state = RunState(plan, BatchLayout.for_pipeline(1, cfg=False), timesteps=timesteps)
    site = sites.of_kind("self")[0].name
    active = []
    for t in timesteps:
        state.begin_step(float(t))
        if site in state.active:
            active.append(state.step_index)
    return active


def _ddim(steps):
    s = DDIMScheduler(**SD_DDIM_SCHEDULER_CONFIG)
    s.set_timesteps(steps)
    return s.timesteps


def test_min_gate_on_ddim_50_is_the_first_20_steps():
    plan, sites = _plan(_config({"probe": {"min": 0.6}}))
    ts = _ddim(50)
    assert [int(t) for t in ts[:2]] == [981, 961]
    assert _active_steps(plan, sites, ts) == list(range(20))
    assert [int(t) for t in ts[19:21]] == [601, 581]


def test_max_only_and_two_sided_windows():
    ts = _ddim(50)
    plan, sites = _plan(_config({"probe": {"max": 0.6}}))
    assert _active_steps(plan, sites, ts) == list(range(20, 50))
    plan, sites = _plan(_config({"probe": {"min": 0.2, "max": 0.6}}))
    assert _active_steps(plan, sites, ts) == [k for k, t in enumerate(ts) if 200 <= int(t) < 600]
    plan, sites = _plan(_config({"probe": {"min": None, "max": None}}))
    assert _active_steps(plan, sites, ts) == list(range(50))


@pytest.mark.parametrize("steps", [7, 25])
def test_gate_uses_the_timestep_value_for_any_scheduler(steps):
    """Euler has non-integer timesteps and another spacing: the rule still reads t / T_train."""
    s = EulerDiscreteScheduler(**{k: v for k, v in SD_DDIM_SCHEDULER_CONFIG.items() if k != "clip_sample" and k != "set_alpha_to_one"})
    s.set_timesteps(steps)
    plan, sites = _plan(_config({"probe": {"min": 0.6}}))
    expected = [k for k, t in enumerate(s.timesteps) if float(t) / 1000 >= 0.6]
    assert 0 < len(expected) < steps
    assert _active_steps(plan, sites, s.timesteps) == expected


def test_gate_through_a_real_pipeline_run():
    """DDIM 5 steps (t = 801, 601, 401, 201, 1): a min 0.6 gate is active on steps 0 and 1 only."""
    probe = ProbePlugin()
    manager = attnctl.StrategyManager(plugins=[timestep_gate, probe], autoload=False)
    pipe = build_tiny_inpaint_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:44] = 255
    image = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    with attnctl.attach(pipe, _config({"probe": {"min": 0.6}}), manager) as ctl:
        with ctl.run(BatchLayout.for_pipeline(1, 1, cfg=False), mask=torch.from_numpy(mask / 255.0)):
            pipe("a cat", image=image, mask_image=Image.fromarray(mask), height=64, width=64, num_inference_steps=5,
                 guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert [int(t) for t in pipe.scheduler.timesteps] == [801, 601, 401, 201, 1]
    assert sorted(set(probe.seen)) == [0, 1]


def test_rule_for_disabled_instance_is_ignored():
    plan, sites = _plan(_config({"probe": {"min": 0.6}}, probe_enabled=False))
    assert plan.site_ops == {} and "probe" not in plan.instances
    # the gate does not leak onto other instances: an ungated probe2 stays always on
    probe = ProbePlugin()
    config = {"strategies": {"probe": {"enabled": False}, "probe2": {"strategy": "probe"},
                             "phases": {"strategy": "timestep_gate", "rules": {"probe": {"min": 0.6}}}}}
    plan, sites = _plan(config, probe)
    assert _active_steps(plan, sites, _ddim(10)) == list(range(10))


def test_unknown_instance_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown strategy instance 'prob'.*did you mean 'probe'"):
        _plan(_config({"prob": {"min": 0.6}}))


@pytest.mark.parametrize(
    "rules, message",
    [
        ({"probe": {"min": 0.6, "max": 0.6}}, "must be smaller than max"),
        ({"probe": {"min": "0.6"}}, "expected a number"),
        ({"probe": {"minimum": 0.6}}, "only 'min' and 'max'"),
        ({"probe": 0.6}, "expected a mapping"),
        ({"phases": {"min": 0.6}}, "cannot gate itself"),
    ],
)
def test_bad_rules_are_refused(rules, message):
    with pytest.raises(ConfigError, match=message):
        _plan(_config(rules))


def test_harmonpaint_phases_split_ddim_50_into_20_and_30():
    """The recipe's rules gate both sides: structure strategies first, style strategies after."""
    probe = ProbePlugin()
    config = {"strategies": {"sams": {"strategy": "probe"}, "makvs": {"strategy": "probe"},
                             "phases": {"strategy": "timestep_gate",
                                        "rules": {"sams": {"min": 0.6}, "makvs": {"max": 0.6}}}}}
    plan, sites = _plan(config, probe)
    state = RunState(plan, BatchLayout.for_pipeline(1, cfg=False), timesteps=_ddim(50))
    name = sites.of_kind("self")[0].name
    structure = []
    for t in _ddim(50):
        state.begin_step(float(t))
        structure.append(tuple(op.strategy for op in state.active[name].reweight))
    assert structure == [("sams",)] * 20 + [("makvs",)] * 30
