"""IP-Adapter (``pipe.load_ip_adapter``, ``IPAdapterAttnProcessor2_0`` at every cross-attention
site) with tiny random weights written offline; embeddings are passed as
``ip_adapter_image_embeds`` (no image encoder), masks through ``cross_attention_kwargs``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import attnctl
from compat_helpers import (
    CUSTOM_SITE,
    DoublingProcessor,
    assert_effect_kept,
    assert_harmonpaint_ran,
    assert_identical,
    assert_same,
    harmonpaint,
    idle,
    ip_image_embeds,
    load_tiny_ip_adapter,
    plain,
    probed,
    running,
    strategies_config,
    write_tiny_ip_adapter,
)


@pytest.fixture
def ip_masks():
    """``cross_attention_kwargs`` with an IP-Adapter mask over the left half of the image."""
    from diffusers.image_processor import IPAdapterMaskProcessor

    left = np.zeros((64, 64), dtype=np.uint8)
    left[:, :32] = 255
    return {"ip_adapter_masks": [IPAdapterMaskProcessor().preprocess([Image.fromarray(left)], height=64, width=64)]}


def test_ip_adapter_loaded_before_attach(pipe, inputs, ip_adapter_weights, ip_masks):
    stock_without = plain(pipe, inputs)
    hp_without = harmonpaint(pipe, inputs)
    load_tiny_ip_adapter(pipe, ip_adapter_weights)
    embeds = {"ip_adapter_image_embeds": ip_image_embeds()}
    stock = plain(pipe, inputs, **embeds)
    stock_masked = plain(pipe, inputs, **embeds, cross_attention_kwargs=ip_masks)
    assert_identical(idle(pipe, inputs, **embeds), stock)
    assert_identical(idle(pipe, inputs, **embeds, cross_attention_kwargs=ip_masks), stock_masked)

    out = harmonpaint(pipe, inputs, **embeds)
    assert_harmonpaint_ran(out, stock[0])
    assert_effect_kept(out, hp_without, stock, stock_without)
    # the mask keeps its effect too (it reaches the processor in both passes)
    out_masked = harmonpaint(pipe, inputs, **embeds, cross_attention_kwargs=ip_masks)
    assert_effect_kept(out_masked, out, stock_masked, stock)


def test_ip_adapter_branch_survives_attnctl_core_at_cross_sites(pipe, inputs, ip_adapter_weights, ip_masks):
    """With an identity strategy at every cross-attention site, attnctl's core computes the text
    attention inside IP-Adapter's processor (SdpaAdapter) and the image branch runs as written:
    the output is the stock IP-Adapter output."""
    load_tiny_ip_adapter(pipe, ip_adapter_weights)
    embeds = {"ip_adapter_image_embeds": ip_image_embeds()}
    for kwargs in ({}, {"cross_attention_kwargs": ip_masks}):
        out, sites = probed(pipe, inputs, "cross", **embeds, **kwargs)
        assert len(sites) == 16
        assert_same(out, plain(pipe, inputs, **embeds, **kwargs))


def test_ip_adapter_loaded_after_attach(pipe, inputs, ip_adapter_weights):
    embeds = {"ip_adapter_image_embeds": ip_image_embeds()}
    stock_without = plain(pipe, inputs)
    with attnctl.attach(pipe, {}) as ctl:
        load_tiny_ip_adapter(pipe, ip_adapter_weights)
        with running(ctl, pipe, inputs) as call:
            idle_out = plain(pipe, inputs, **call, **embeds)
    stock = plain(pipe, inputs, **embeds)
    assert_identical(idle_out, stock)
    pipe.unload_ip_adapter()

    with attnctl.attach(pipe, strategies_config()) as ctl:
        with running(ctl, pipe, inputs) as call:
            hp_without = plain(pipe, inputs, **call)
        load_tiny_ip_adapter(pipe, ip_adapter_weights)
        with running(ctl, pipe, inputs) as call:
            out = plain(pipe, inputs, **call, **embeds)
        wrapped = {type(p.original).__name__ for p in ctl.processors.values()}
    assert "IPAdapterAttnProcessor2_0" in wrapped  # the new processors were wrapped at the next run
    assert_harmonpaint_ran(out, stock)
    assert_effect_kept(out, hp_without, stock, stock_without)


def test_loading_ip_adapter_after_attach_keeps_other_sites_processors(pipe, inputs, ip_adapter_weights):
    embeds = {"ip_adapter_image_embeds": ip_image_embeds()}
    site = pipe.unet.get_submodule(CUSTOM_SITE)
    site.set_processor(DoublingProcessor())
    load_tiny_ip_adapter(pipe, ip_adapter_weights)
    stock = plain(pipe, inputs, **embeds)  # diffusers keeps a DoublingProcessor at the self-attention site
    pipe.unload_ip_adapter()
    site.set_processor(DoublingProcessor())
    with attnctl.attach(pipe, {}) as ctl:
        load_tiny_ip_adapter(pipe, ip_adapter_weights)
        with running(ctl, pipe, inputs) as call:
            idle_out = plain(pipe, inputs, **call, **embeds)
    assert_identical(idle_out, stock)


def test_ip_adapter_scale_set_while_attached_is_used(pipe, inputs, ip_adapter_weights):
    load_tiny_ip_adapter(pipe, ip_adapter_weights)
    embeds = {"ip_adapter_image_embeds": ip_image_embeds()}
    pipe.set_ip_adapter_scale(0.3)
    stock = plain(pipe, inputs, **embeds)
    pipe.set_ip_adapter_scale(1.0)
    with attnctl.attach(pipe, {}) as ctl:
        pipe.set_ip_adapter_scale(0.3)
        with running(ctl, pipe, inputs) as call:
            idle_out = plain(pipe, inputs, **call, **embeds)
    assert_identical(idle_out, stock)


def test_two_ip_adapters_with_masks_as_one_tensor(pipe, inputs, ip_adapter_weights, tmp_path):
    second = write_tiny_ip_adapter(pipe.unet, tmp_path, seed=1, name="second.safetensors")
    load_tiny_ip_adapter(pipe, ip_adapter_weights, second)
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, ..., :32], masks[1, ..., 32:] = 1.0, 1.0
    kwargs = {"ip_adapter_image_embeds": ip_image_embeds(1) + ip_image_embeds(2),
              "cross_attention_kwargs": {"ip_adapter_masks": masks}}
    stock = plain(pipe, inputs, **kwargs)
    assert_identical(idle(pipe, inputs, **kwargs), stock)
    assert_harmonpaint_ran(harmonpaint(pipe, inputs, **kwargs), stock[0])
