"""The SDXL recipe's selectors pick the documented sites of SDXL's 70+70 layout."""

from __future__ import annotations

import pytest

from attnctl.selectors import select_sites
from attnctl.sites import describe_sites
from harmonpaint_recipe.loading import load_recipe, resolved


@pytest.fixture(scope="module")
def sdxl_sites():
    from diffusers import UNet2DConditionModel

    from attnctl.testing import TINY_SDXL_UNET_CONFIG

    return describe_sites(UNet2DConditionModel(**TINY_SDXL_UNET_CONFIG))


def test_tiny_sdxl_has_sdxl_site_layout(sdxl_sites):
    assert len(sdxl_sites.of_kind("self")) == 70 and len(sdxl_sites.of_kind("cross")) == 70
    assert sdxl_sites.levels == {1, 2}


def test_sdxl_recipe_sites(sdxl_sites):
    s = resolved(load_recipe("harmonpaint-sdxl"))["strategies"]
    sams = select_sites(s["sams"]["sites"], sdxl_sites)
    assert [x.index for x in sams] == list(range(34)) and {x.stage for x in sams} == {"down", "mid"}
    makvs = select_sites(s["makvs"]["sites"], sdxl_sites)
    assert [x.index for x in makvs] == list(range(44, 70))
    assert all(x.stage == "up" for x in makvs) and "up_blocks.0.attentions.0." not in " ".join(x.name for x in makvs)
    steer = select_sites(s["steer"]["read_sites"], sdxl_sites)
    assert len(steer) == 70 and {x.level for x in steer} == {1, 2}
