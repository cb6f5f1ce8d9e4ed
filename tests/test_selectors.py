"""Selector syntax: kinds, index ranges, stages, grid factors, unions and errors."""

from __future__ import annotations

import pytest

from attnctl.errors import SelectorError
from attnctl.selectors import select_sites
from attnctl.sites import describe_sites
from attnctl.testing import build_unet


@pytest.fixture(scope="module")
def sd15():
    return describe_sites(build_unet("sd15-inpaint", device="meta"))


def keys(sites):
    return [s.key for s in sites]


def test_index_range(sd15):
    assert keys(select_sites("self[2:7]", sd15)) == [f"self[{i}]" for i in range(2, 7)]


def test_last_eight(sd15):
    assert keys(select_sites("self[-8:]", sd15)) == [f"self[{i}]" for i in range(8, 16)]


def test_single_index_and_negative(sd15):
    assert keys(select_sites("cross[3]", sd15)) == ["cross[3]"]
    assert keys(select_sites("cross[-1]", sd15)) == ["cross[15]"]


def test_grid_factor_union_matches_spec_read_sites(sd15):
    # docs/harmonpaint.md: the 16x16 and 32x32 grids at 512x512 are cross sites 2-5 and 7-12
    picked = select_sites("cross/4,cross/2", sd15)
    assert [s.index for s in picked] == [2, 3, 4, 5, 7, 8, 9, 10, 11, 12]


def test_stage_and_any_kind(sd15):
    assert keys(select_sites("*@mid", sd15)) == ["self[6]", "cross[6]"]
    assert [s.index for s in select_sites("self@up", sd15)] == list(range(7, 16))


def test_filters_apply_before_index(sd15):
    assert keys(select_sites("self@up[0:2]", sd15)) == ["self[7]", "self[8]"]


def test_list_is_union_and_whitespace_ignored(sd15):
    assert keys(select_sites(["self[0]", " self[1] "], sd15)) == ["self[0]", "self[1]"]


@pytest.mark.parametrize("selector", ["self[40:]", "self@mid/2", "cross[16]"])
def test_empty_match_is_an_error_listing_sites(sd15, selector):
    with pytest.raises(SelectorError) as info:
        select_sites(selector, sd15)
    message = str(info.value)
    assert f"'{selector}' matches no attention site" in message
    assert "self[15]" in message and "up_blocks.3.attentions.2.transformer_blocks.0.attn1" in message


@pytest.mark.parametrize("selector", ["slef[2:7]", "self[a:b]", "cross/3", "", "self(2)"])
def test_malformed_selectors(sd15, selector):
    with pytest.raises(SelectorError):
        select_sites(selector, sd15)
