"""LoRA through peft (``unet.add_adapter``), added before and after attaching."""

from __future__ import annotations

from peft import LoraConfig

import attnctl
from compat_helpers import (
    assert_effect_kept,
    assert_harmonpaint_ran,
    assert_identical,
    assert_same,
    harmonpaint,
    idle,
    plain,
    running,
    seeded_rng,
    strategies_config,
)


def add_lora(pipe, seed: int = 11) -> None:
    """A rank-4 LoRA on every attention projection; random A and B, so it changes the output."""
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)
    with seeded_rng(seed):
        pipe.unet.add_adapter(config)


def test_lora_added_before_attach(pipe, inputs):
    stock_without = plain(pipe, inputs)
    hp_without = harmonpaint(pipe, inputs)
    add_lora(pipe)
    stock = plain(pipe, inputs)
    half = {"cross_attention_kwargs": {"scale": 0.5}}  # the LoRA scale reaches the UNet through these
    assert_identical(idle(pipe, inputs), stock)
    assert_identical(idle(pipe, inputs, **half), plain(pipe, inputs, **half))

    out = harmonpaint(pipe, inputs)
    assert_harmonpaint_ran(out, stock[0])
    assert_effect_kept(out, hp_without, stock, stock_without)
    # the LoRA scale acts in the main and the guidance pass alike: at 0, HarmonPaint runs without LoRA
    assert_same(harmonpaint(pipe, inputs, cross_attention_kwargs={"scale": 0.0}), hp_without)


def test_lora_added_after_attach(pipe, inputs):
    stock_without = plain(pipe, inputs)
    with attnctl.attach(pipe, {}) as ctl:
        add_lora(pipe)
        with running(ctl, pipe, inputs) as call:
            idle_out = plain(pipe, inputs, **call)
    stock = plain(pipe, inputs)
    assert_identical(idle_out, stock)
    pipe.unet.delete_adapters("default")
    assert_identical(plain(pipe, inputs), stock_without)

    with attnctl.attach(pipe, strategies_config()) as ctl:
        with running(ctl, pipe, inputs) as call:
            hp_without = plain(pipe, inputs, **call)
        add_lora(pipe)
        with running(ctl, pipe, inputs) as call:
            out = plain(pipe, inputs, **call)
    assert_harmonpaint_ran(out, stock)
    assert_effect_kept(out, hp_without, stock, stock_without)
