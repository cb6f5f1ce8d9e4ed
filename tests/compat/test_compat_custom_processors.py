"""A user's own attention processors at a site where HarmonPaint acts (self[3], SAMS):
one that doubles its output, one with its own keyword argument (``gain``) passed through
``cross_attention_kwargs``. Idle, they run untouched; with a strategy there, ``attach``
refuses them by name unless an adapter is registered, and with one their effect survives."""

from __future__ import annotations

import pytest

import attnctl
from attnctl.errors import UnsupportedProcessorError
from compat_helpers import (
    CUSTOM_SITE,
    DoublingProcessor,
    GainProcessor,
    assert_effect_kept,
    assert_harmonpaint_ran,
    assert_identical,
    assert_same,
    harmonpaint,
    idle,
    plain,
    probed,
)


@pytest.fixture
def quiet_diffusers():
    """diffusers logs "cross_attention_kwargs ['gain'] are not expected by ..." at every other site."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    yield
    diffusers_logging.set_verbosity(level)


def test_doubling_processor(pipe, inputs):
    stock_without, hp_without = plain(pipe, inputs), harmonpaint(pipe, inputs)
    pipe.unet.get_submodule(CUSTOM_SITE).set_processor(DoublingProcessor())
    stock = plain(pipe, inputs)
    assert_identical(idle(pipe, inputs), stock)

    with pytest.raises(UnsupportedProcessorError, match=r"self\[3\] .*DoublingProcessor.*strategies\.sams.*adapters="):
        harmonpaint(pipe, inputs)
    adapters = {DoublingProcessor: attnctl.SdpaAdapter()}
    out = harmonpaint(pipe, inputs, adapters=adapters)
    assert_harmonpaint_ran(out, stock[0])
    assert_effect_kept(out, hp_without, stock, stock_without)
    # exact: attnctl's core inside the processor (identity strategy), the doubling applied as written
    assert_same(probed(pipe, inputs, "self[3]", adapters=adapters)[0], stock)


def test_processor_with_its_own_keyword_argument(pipe, inputs, quiet_diffusers):
    pipe.unet.get_submodule(CUSTOM_SITE).set_processor(GainProcessor())
    gain = {"cross_attention_kwargs": {"gain": 1.5}}
    stock, stock_unit = plain(pipe, inputs, **gain), plain(pipe, inputs)
    assert_identical(idle(pipe, inputs, **gain), stock)

    with pytest.raises(UnsupportedProcessorError, match=r"self\[3\] .*GainProcessor"):
        harmonpaint(pipe, inputs, **gain)
    adapters = {GainProcessor: attnctl.SdpaAdapter()}
    out = harmonpaint(pipe, inputs, adapters=adapters, **gain)
    assert_harmonpaint_ran(out, stock[0])
    assert_effect_kept(out, harmonpaint(pipe, inputs, adapters=adapters), stock, stock_unit)
    assert_same(probed(pipe, inputs, "self[3]", adapters=adapters, **gain)[0], stock)


def test_adapter_registered_by_qualified_class_name(pipe, inputs):
    """``adapters`` also takes the class's qualified name (for plugins that cannot import it)."""
    pipe.unet.get_submodule(CUSTOM_SITE).set_processor(DoublingProcessor())
    name = f"{DoublingProcessor.__module__}.{DoublingProcessor.__qualname__}"
    out, sites = probed(pipe, inputs, "self[3]", adapters={name: attnctl.SdpaAdapter()})
    assert sites == {CUSTOM_SITE}
    assert_same(out, plain(pipe, inputs))


def test_custom_processor_at_a_site_no_strategy_uses_is_left_alone(pipe, inputs):
    """self[0] is outside every HarmonPaint selector: no adapter needed, and its effect is kept."""
    stock_without, hp_without = plain(pipe, inputs), harmonpaint(pipe, inputs)
    pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1").set_processor(DoublingProcessor())
    stock = plain(pipe, inputs)
    assert_identical(idle(pipe, inputs), stock)
    assert_effect_kept(harmonpaint(pipe, inputs), hp_without, stock, stock_without)
