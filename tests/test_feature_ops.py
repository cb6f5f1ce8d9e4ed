"""Feature ops (``attnctl.feature_ops``): what a non-attention module returns, rewritten where and
when an op is active, through a forward hook that exists only while such an op is planned."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import attnctl
from attnctl.errors import ConfigError
from attnctl.feature_ops import FeatureOp, resolve_modules
from attnctl.plugins import StrategyManager

sys.path.insert(0, str(Path(__file__).parent))
from toy_strategies import FactoryPlugin  # noqa: E402

STEPS = 3


@dataclass(eq=False)
class Doubled(FeatureOp):
    """Twice the module's output."""

    def apply(self, call):
        return call.output * 2


def _norms(pipe):
    return [(n, m) for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.GroupNorm)]


def test_a_feature_op_acts_on_its_modules_in_its_steps_only(tiny_pipe, image_and_mask):
    from_step = lambda state: state.step_index is not None and state.step_index >= 1  # noqa: E731
    plugin = FactoryPlugin(lambda inst, sites: [Doubled(inst, modules="down_blocks.0.resnets.*.norm1",
                                                        gates=(from_step,))])
    ctl = attnctl.attach(tiny_pipe, {"strategies": {"x": {"strategy": "toy_ops"}}},
                         manager=StrategyManager(plugins=[plugin], autoload=False))
    seen = []  # after attnctl's hook: (module name, input, output) per call
    hooks = [m.register_forward_hook(lambda mod, a, out, name=n: seen.append((name, a[0].clone(), out.clone())))
             for n, m in _norms(tiny_pipe)]
    image, mask = image_and_mask
    with ctl.run(attnctl.BatchLayout.for_call(tiny_pipe, prompt="a cat", guidance_scale=7.5), mask=mask):
        tiny_pipe(prompt="a cat", image=image, mask_image=mask, num_inference_steps=STEPS, output_type="latent")
    for h in hooks:
        h.remove()
    ctl.detach()
    modules = dict(_norms(tiny_pipe))
    targets = {n for n in modules if n.startswith("down_blocks.0.resnets.") and n.endswith(".norm1")}
    per_step = len(seen) // STEPS
    for i, (name, x, out) in enumerate(seen):
        stock = modules[name](x)
        factor = 2.0 if name in targets and i >= per_step else 1.0
        assert torch.allclose(out, factor * stock), (name, i // per_step)
    assert targets and all(not m._forward_hooks for m in modules.values())  # detach took the hooks away


def test_modules_are_selected_by_class_or_dotted_pattern(tiny_pipe):
    named = list(tiny_pipe.unet.named_modules())
    norms = resolve_modules("GroupNorm", named, "strategies.x")
    assert norms == [n for n, _ in _norms(tiny_pipe)]
    picked = resolve_modules("up_blocks.*.resnets.0.norm2, conv_norm_out", named, "strategies.x")
    assert picked == [n for n in norms if n.startswith("up_blocks.") and n.endswith("resnets.0.norm2")] + \
        ["conv_norm_out"]
    with pytest.raises(ConfigError, match="strategies.x: modules='LayerNorm2' names no module"):
        resolve_modules("LayerNorm2", named, "strategies.x")


def test_idle_attach_hooks_no_module(tiny_pipe):
    with attnctl.attach(tiny_pipe):
        assert all(not m._forward_hooks for _, m in _norms(tiny_pipe))
