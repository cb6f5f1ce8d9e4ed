"""Attach / run / detach: the idle invariant, restoring processors, foreign-processor detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import attnctl
from attnctl import BatchLayout, StrategyManager
from attnctl.errors import ConfigError, UnsupportedProcessorError
from toy_strategies import ScalePlugin, run_pipe


def mask_tensor(mask_image):
    return torch.from_numpy(np.array(mask_image) / 255.0)


@pytest.mark.parametrize(
    "prompts,cfg,nip",
    [(("a cat",), True, 1), (("a cat",), False, 1), (("a cat", "a dog"), True, 2)],
    ids=["cfg", "no-cfg", "batch2x2"],
)
def test_idle_attach_is_bit_identical_to_stock(tiny_pipe, image_and_mask, prompts, cfg, nip):
    image, mask = image_and_mask
    stock = run_pipe(tiny_pipe, image, mask, prompts, cfg, nip)
    with attnctl.attach(tiny_pipe, {}, manager=StrategyManager(autoload=False)) as ctl:
        attached = run_pipe(tiny_pipe, image, mask, prompts, cfg, nip)
        layout = BatchLayout.for_pipeline(len(prompts), nip, cfg)
        with ctl.run(layout, mask=mask_tensor(mask)):
            in_run = run_pipe(tiny_pipe, image, mask, prompts, cfg, nip)
    assert np.array_equal(stock, attached)
    assert np.array_equal(stock, in_run)


def test_active_but_gated_off_is_bit_identical(tiny_pipe, image_and_mask):
    """Strategies whose gates are closed on every step leave the output untouched."""
    image, mask = image_and_mask
    stock = run_pipe(tiny_pipe, image, mask)
    manager = StrategyManager(plugins=[ScalePlugin()], autoload=False)
    config = {"strategies": {"s": {"strategy": "toy_scale"}}}
    with attnctl.attach(tiny_pipe, config, manager=manager) as ctl:
        for ops in ctl.plan.site_ops.values():
            for op in ops:
                op.gates = (lambda state: False,)
        with ctl.run(BatchLayout.for_pipeline(1), mask=mask_tensor(mask)):
            out = run_pipe(tiny_pipe, image, mask)
    assert np.array_equal(stock, out)


def test_detach_restores_the_same_processor_objects(tiny_pipe):
    before = dict(tiny_pipe.unet.attn_processors)
    params_before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    ctl = attnctl.attach(tiny_pipe, {}, manager=StrategyManager(autoload=False))
    assert all(isinstance(p, attnctl.processor.ControlledProcessor) for p in tiny_pipe.unet.attn_processors.values())
    ctl.detach()
    after = tiny_pipe.unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert not tiny_pipe.unet._forward_pre_hooks
    state = tiny_pipe.unet.state_dict()
    assert state.keys() == params_before.keys()
    assert all(torch.equal(state[k], params_before[k]) for k in state)
    ctl.detach()  # idempotent


def test_module_processors_stay_registered(tiny_pipe):
    """An nn.Module processor keeps its weights visible while wrapped, and comes back as is."""

    class WeightedProcessor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(()))

        def forward(self, attn, hidden_states, *args, **kwargs):
            return AttnProcessor2_0()(attn, hidden_states, *args, **kwargs) * self.gain

    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    module = tiny_pipe.unet.get_submodule(name)
    custom = WeightedProcessor()
    module.set_processor(custom)
    n_params = len(list(tiny_pipe.unet.parameters()))
    ctl = attnctl.attach(tiny_pipe, {}, manager=StrategyManager(autoload=False))
    assert len(list(tiny_pipe.unet.parameters())) == n_params
    assert module.processor.original is custom
    ctl.detach()
    assert module.processor is custom


class ForeignProcessor:
    """A user's processor attnctl has no adapter for: plain attention, output doubled."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        return 2 * AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def test_known_processors_set_after_attach_are_wrapped_and_controlled(tiny_pipe, image_and_mask):
    """set_attn_processor after attach: attnctl wraps the new processors at the next run and keeps acting."""
    image, mask = image_and_mask
    manager = StrategyManager(plugins=[ScalePlugin()], autoload=False)
    config = {"strategies": {"s": {"strategy": "toy_scale", "factor": 0.5}}}
    with attnctl.attach(tiny_pipe, config, manager=manager) as ctl:
        with ctl.run(BatchLayout.for_pipeline(1), mask=mask_tensor(mask)):
            expected = run_pipe(tiny_pipe, image, mask)
        replacement = AttnProcessor()
        tiny_pipe.unet.set_attn_processor(replacement)
        with ctl.run(BatchLayout.for_pipeline(1), mask=mask_tensor(mask)):
            out = run_pipe(tiny_pipe, image, mask)
        assert all(p.original is replacement for p in tiny_pipe.unet.attn_processors.values())
    assert np.abs(out - expected).max() < 1e-5  # AttnProcessor computes the same attention
    assert all(p is replacement for p in tiny_pipe.unet.attn_processors.values())  # detach keeps the user's choice


def test_unknown_processor_set_after_attach_is_refused_with_its_name(tiny_pipe, image_and_mask):
    image, mask = image_and_mask
    manager = StrategyManager(plugins=[ScalePlugin()], autoload=False)
    ctl = attnctl.attach(tiny_pipe, {"strategies": {"s": {"strategy": "toy_scale"}}}, manager=manager)
    tiny_pipe.unet.set_attn_processor(ForeignProcessor())
    with pytest.raises(UnsupportedProcessorError, match=r"self\[2\] .* ForeignProcessor.*strategies\.s"):
        with ctl.run(BatchLayout.for_pipeline(1), mask=mask_tensor(mask)):
            pass
    with pytest.raises(UnsupportedProcessorError, match="ForeignProcessor"):
        run_pipe(tiny_pipe, image, mask)  # outside a run too


def test_unknown_processor_at_an_idle_site_is_kept(tiny_pipe, image_and_mask):
    """No strategy acts there: the user's processor runs as is, attached or not."""
    image, mask = image_and_mask
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"  # self[0]; toy_scale acts at self[2:7]
    tiny_pipe.unet.get_submodule(name).set_processor(ForeignProcessor())
    stock = run_pipe(tiny_pipe, image, mask)
    manager = StrategyManager(plugins=[ScalePlugin()], autoload=False)
    with attnctl.attach(tiny_pipe, {"strategies": {"s": {"strategy": "toy_scale", "factor": 1.0}}}, manager=manager) as ctl:
        with ctl.run(BatchLayout.for_pipeline(1), mask=mask_tensor(mask)):
            out = run_pipe(tiny_pipe, image, mask)
    assert np.abs(out - stock).max() < 1e-5


def test_active_plan_outside_a_run_is_an_error(tiny_pipe, image_and_mask):
    image, mask = image_and_mask
    manager = StrategyManager(plugins=[ScalePlugin()], autoload=False)
    with attnctl.attach(tiny_pipe, {"strategies": {"s": {"strategy": "toy_scale"}}}, manager=manager):
        with pytest.raises(ConfigError, match="called outside a run"):
            run_pipe(tiny_pipe, image, mask)


def test_double_attach_is_refused(tiny_pipe):
    with attnctl.attach(tiny_pipe, {}, manager=StrategyManager(autoload=False)):
        with pytest.raises(ConfigError, match="already has an attnctl controller"):
            attnctl.attach(tiny_pipe, {}, manager=StrategyManager(autoload=False))


def test_run_state_is_dropped_after_the_run(tiny_pipe, image_and_mask):
    image, mask = image_and_mask
    manager = StrategyManager(plugins=[ScalePlugin()], autoload=False)
    with attnctl.attach(tiny_pipe, {"strategies": {"s": {"strategy": "toy_scale"}}}, manager=manager) as ctl:
        with ctl.run(BatchLayout.for_pipeline(1), mask=mask_tensor(mask)) as state:
            run_pipe(tiny_pipe, image, mask)
            assert ctl.state is state and state.timestep is not None and state.step_index == 2
        assert ctl.state is None


def test_compiled_unet_wrapper_is_refused_with_the_fix(tiny_pipe):
    from attnctl.errors import UnsupportedModelError

    tiny_pipe.unet = torch.compile(tiny_pipe.unet)
    with pytest.raises(UnsupportedModelError, match=r"wrapped by torch.compile\(\); attach to the uncompiled UNet"):
        attnctl.attach(tiny_pipe, {}, manager=StrategyManager(autoload=False))
