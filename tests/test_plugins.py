"""Plugin manager: discovery, validation, planning, order independence."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import attnctl
from attnctl import BatchLayout, StrategyManager, hookimpl
from attnctl.errors import ConfigError
from toy_strategies import MaskGainPlugin, ScalePlugin, WindowPlugin, run_pipe


def test_misspelled_hook_fails_loudly():
    class Typo:
        @hookimpl
        def attnctl_add_strategy(self):  # missing 's'
            return []

    with pytest.raises(ConfigError, match="attnctl_add_strategy"):
        StrategyManager(plugins=[Typo()], autoload=False)


def test_unknown_strategy_names_the_closest():
    manager = StrategyManager(plugins=[ScalePlugin()], autoload=False)
    with pytest.raises(ConfigError, match=r"unknown strategy 'toy_scal' in strategies.x \(did you mean 'toy_scale'\?\)"):
        attnctl.compile_plan({"strategies": {"x": {"strategy": "toy_scal"}}}, _sites(), manager)


def test_unknown_and_mistyped_parameters():
    manager = StrategyManager(plugins=[ScalePlugin()], autoload=False)
    with pytest.raises(ConfigError, match=r"unknown parameter 'strategies.s.factr'.*did you mean 'factor'"):
        attnctl.compile_plan({"strategies": {"s": {"strategy": "toy_scale", "factr": 2}}}, _sites(), manager)
    with pytest.raises(ConfigError, match=r"strategies.s.factor: expected float, got str"):
        attnctl.compile_plan({"strategies": {"s": {"strategy": "toy_scale", "factor": "big"}}}, _sites(), manager)
    with pytest.raises(ConfigError, match=r"strategies.s.enabled: expected true or false"):
        attnctl.compile_plan({"strategies": {"s": {"strategy": "toy_scale", "enabled": "no"}}}, _sites(), manager)


def test_disabled_instances_plan_nothing():
    manager = StrategyManager(plugins=[ScalePlugin()], autoload=False)
    plan = attnctl.compile_plan({"strategies": {"s": {"strategy": "toy_scale", "enabled": False}}}, _sites(), manager)
    assert plan.is_idle


def test_duplicate_strategy_names_are_refused():
    with pytest.raises(ConfigError, match="two plugins provide a strategy named 'toy_scale'"):
        StrategyManager(plugins=[ScalePlugin(), ScalePlugin()], autoload=False).strategies()


def test_gate_naming_unknown_instance():
    manager = StrategyManager(plugins=[ScalePlugin(), WindowPlugin()], autoload=False)
    config = {"strategies": {"s": {"strategy": "toy_scale"}, "g": {"strategy": "toy_window", "target": "ss"}}}
    with pytest.raises(ConfigError, match="gates unknown strategy instance 'ss'"):
        attnctl.compile_plan(config, _sites(), manager)


def test_plan_does_not_call_pluggy_per_attention_call(tiny_pipe, image_and_mask):
    image, mask = image_and_mask
    manager = StrategyManager(plugins=[ScalePlugin()], autoload=False)
    calls = []
    manager.pm.add_hookcall_monitoring(lambda name, impls, kwargs: calls.append(name), lambda *a: None)
    with attnctl.attach(tiny_pipe, {"strategies": {"s": {"strategy": "toy_scale"}}}, manager=manager) as ctl:
        n_attach = len(calls)
        with ctl.run(BatchLayout.for_pipeline(1), mask=torch.ones(8, 8)):
            run_pipe(tiny_pipe, image, mask)
    assert calls[n_attach:] == ["attnctl_run_start", "attnctl_run_end"]


def test_composition_is_independent_of_registration_order(tiny_pipe, image_and_mask):
    """Two strategies sharing sites 4-6 give the same image whichever is registered first."""
    image, mask = image_and_mask
    config = {
        "strategies": {
            "b_scale": {"strategy": "toy_scale", "sites": "self[2:7]", "factor": 0.7},
            "a_gain": {"strategy": "toy_mask_gain", "sites": "self[4:9]", "gain": 1.5},
        }
    }
    mask_t = torch.from_numpy(np.array(mask) / 255.0)
    results = []
    for plugins in itertools.permutations([ScalePlugin(), MaskGainPlugin()]):
        for conf in (config, {"strategies": dict(reversed(list(config["strategies"].items())))}):
            manager = StrategyManager(plugins=plugins, autoload=False)
            with attnctl.attach(tiny_pipe, conf, manager=manager) as ctl:
                with ctl.run(BatchLayout.for_pipeline(1), mask=mask_t):
                    results.append(run_pipe(tiny_pipe, image, mask))
    stock = run_pipe(tiny_pipe, image, mask)
    assert not np.array_equal(results[0], stock)
    for r in results[1:]:
        assert np.array_equal(r, results[0])


def test_autoload_env_var_keeps_only_builtin_entry_points(tmp_path):
    """With ATTNCTL_DISABLE_PLUGIN_AUTOLOAD=1 only attnctl's own entry points are loaded."""
    code = (
        "from importlib import metadata; from attnctl.plugins import StrategyManager, ENTRY_POINT_GROUP;"
        "m = StrategyManager();"
        "own = sorted(e.name for e in metadata.entry_points(group=ENTRY_POINT_GROUP) if e.dist.name == 'attnctl');"
        "names = sorted(n for n, _ in m.pm.list_name_plugin());"
        "print(names == own, StrategyManager(autoload=False).pm.get_plugins() == set())"
    )
    env = {**os.environ, "ATTNCTL_DISABLE_PLUGIN_AUTOLOAD": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]


def _sites():
    from attnctl.sites import describe_sites
    from attnctl.testing import build_unet

    return describe_sites(build_unet("sd15-inpaint", device="meta"))
