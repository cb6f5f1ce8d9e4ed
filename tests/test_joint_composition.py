"""Strategies on transformers next to what users combine with them: LoRA, fused projections, IP-Adapter, backends."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

import attnctl
from attnctl import BatchLayout, StrategyManager
from attnctl.errors import ConfigError, UnsupportedProcessorError
from attnctl.processor import innermost
from reference_joint import JointCase, NaiveJointAttention, flux_inputs, sd3_inputs, tiny_flux, tiny_sd3
from test_joint_sites import GRID, LATENT, box_mask, token_masks

SAMS = {"strategies": {"sams": {"strategy": "region_mask", "sites": "*", "tau": 0.1},
                       "makvs": {"strategy": "kv_bank", "sites": "*", "scale": 1.4}}}


def run(model, config, inputs, cfg=False):
    with attnctl.attach(model, config) as ctl, ctl.run(BatchLayout.for_pipeline(1, cfg=cfg), mask=box_mask()):
        with torch.no_grad():
            return model(**inputs)[0]


def stock(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def test_lora_through_peft_is_kept_idle_and_under_the_strategies():
    model = tiny_flux(dtype=torch.float64)
    inputs = flux_inputs(GRID, dtype=torch.float64)
    without = stock(model, inputs)
    torch.manual_seed(11)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False))
    with_lora = stock(model, inputs)
    assert (with_lora - without).abs().max() > 1e-3  # the control: the LoRA acts
    assert torch.equal(run(model, {}, inputs), with_lora)
    config = {"strategies": {"sams": {"strategy": "region_mask", "sites": "*", "tau": 0.1}}}
    fast = run(model, config, inputs)
    with NaiveJointAttention(JointCase(("txt", "img"), 7, token_masks(1), tau=0.1)), torch.no_grad():
        reference = model(**inputs)[0]
    assert (fast - reference).abs().max() < 1e-8


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_fused_projections_keep_the_strategies_exact(family):
    """FLUX keeps its processor class when fused; SD3 swaps in FusedJointAttnProcessor2_0, wrapped again
    (on SD3 without SD3.5's image-only attn2, which diffusers' fused processor cannot run)."""
    if family == "flux":
        model, inputs, order, text, rows = tiny_flux(dtype=torch.float64), flux_inputs(GRID, dtype=torch.float64), \
            ("txt", "img"), 7, 1
    else:
        model, inputs, order, text, rows = tiny_sd3(dtype=torch.float64, dual_attention_layers=()), \
            sd3_inputs(LATENT, dtype=torch.float64), ("img", "txt"), 5, 2
    model.fuse_qkv_projections()
    cfg = family == "sd3"
    with attnctl.attach(model, SAMS) as ctl, ctl.run(BatchLayout.for_pipeline(1, cfg=cfg), mask=box_mask()):
        with torch.no_grad():
            fused = model(**inputs)[0]
        kinds = {type(innermost(p)).__name__ for p in model.attn_processors.values()}
    assert kinds == ({"FluxAttnProcessor"} if family == "flux" else {"FusedJointAttnProcessor2_0"})
    case = JointCase(order, text, token_masks(rows), tau=0.1, lam=1.4)
    with NaiveJointAttention(case), torch.no_grad():
        reference = model(**inputs)[0]
    assert (fused - reference).abs().max() < 1e-8


def test_flux_ip_adapter_processor_is_refused_by_name_where_strategies_act_and_kept_elsewhere():
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    model = tiny_flux()
    ip = FluxIPAdapterAttnProcessor(hidden_size=32, cross_attention_dim=32, num_tokens=(4,), scale=1.0)
    model.transformer_blocks[0].attn.set_processor(ip)
    config = {"strategies": {"sams": {"strategy": "region_mask", "sites": "joint[0]"}}}
    with pytest.raises(UnsupportedProcessorError, match=r"joint\[0\].*FluxIPAdapterAttnProcessor"):
        attnctl.attach(model, config)
    idle_there = {"strategies": {"sams": {"strategy": "region_mask", "sites": "single"}}}
    with attnctl.attach(model, idle_there):
        assert model.transformer_blocks[0].attn.processor.original is ip


def test_a_non_native_attention_backend_is_refused_at_active_sites_only():
    model = tiny_flux()
    inputs = flux_inputs(GRID)
    processor = model.single_transformer_blocks[1].attn.processor
    processor._attention_backend = "flash"  # what set_attention_backend("flash") stores
    config = {"strategies": {"sams": {"strategy": "region_mask", "sites": "single[1]"}}}
    with pytest.raises(UnsupportedProcessorError, match=r"single\[1\].*attention backend 'flash'"):
        run(model, config, inputs)
    processor._attention_backend = None
    baseline = stock(model, inputs)
    processor._attention_backend = "flash"
    with attnctl.attach(model, {"strategies": {"sams": {"strategy": "region_mask", "sites": "joint"}}}) as ctl:
        assert ctl.processors["single_transformer_blocks.1.attn"].original is processor  # idle there: kept
    processor._attention_backend = None
    assert torch.equal(stock(model, inputs), baseline)


def test_context_parallelism_is_refused_at_active_sites():
    model = tiny_flux()
    processor = model.transformer_blocks[0].attn.processor
    processor._parallel_config = object()  # what enable_parallelism sets
    config = {"strategies": {"sams": {"strategy": "region_mask", "sites": "joint[0]"}}}
    with pytest.raises(UnsupportedProcessorError, match=r"context parallelism"):
        run(model, config, flux_inputs(GRID))


def test_a_transformer_cache_is_refused_while_strategies_act():
    from diffusers import FirstBlockCacheConfig

    model = tiny_flux()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    config = {"strategies": {"sams": {"strategy": "region_mask", "sites": "joint"}}}
    with pytest.raises(ConfigError, match=r"cache enabled .*disable_cache\(\)"):
        run(model, config, flux_inputs(GRID))
    model.disable_cache()
    run(model, config, flux_inputs(GRID))  # and without it, it runs
