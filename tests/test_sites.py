"""Site tables: execution-order numbering, stages, levels and run-time grids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnctl.errors import UnsupportedModelError
from attnctl.sites import describe_sites, grid_at
from attnctl.testing import DIT_CONFIGS, UNET_CONFIGS, build_transformer, build_unet

SNAPSHOTS = Path(__file__).parent / "data" / "sites"
LATENT = {"sd15-inpaint": (64, 64), "sd2-inpaint": (96, 96), "sdxl-inpaint": (128, 128)}

# docs/harmonpaint.md "Where the strategies act": index range -> (module prefix, grid at 512x512)
SD15_SPEC = [
    (range(0, 2), "down_blocks.0.attentions.{}", 64),
    (range(2, 4), "down_blocks.1.attentions.{}", 32),
    (range(4, 6), "down_blocks.2.attentions.{}", 16),
    (range(6, 7), "mid_block.attentions.{}", 8),
    (range(7, 10), "up_blocks.1.attentions.{}", 16),
    (range(10, 13), "up_blocks.2.attentions.{}", 32),
    (range(13, 16), "up_blocks.3.attentions.{}", 64),
]


@pytest.mark.parametrize("arch", sorted(UNET_CONFIGS))
def test_site_table_matches_snapshot(arch):
    table = describe_sites(build_unet(arch, device="meta"))
    expected = (SNAPSHOTS / f"{arch}.txt").read_text()
    assert table.format(LATENT[arch]) + "\n" == expected


def test_sd15_table_is_the_spec_table():
    table = describe_sites(build_unet("sd15-inpaint", device="meta"))
    for kind, attn in (("self", "attn1"), ("cross", "attn2")):
        sites = table.of_kind(kind)
        assert len(sites) == 16
        for indices, prefix, grid in SD15_SPEC:
            for j, i in enumerate(indices):
                assert sites[i].name == prefix.format(j) + f".transformer_blocks.0.{attn}"
                assert sites[i].grid((64, 64)) == (grid, grid)
    assert [s.stage for s in table.of_kind("self")] == ["down"] * 6 + ["mid"] + ["up"] * 9


def test_numbering_is_not_registration_order():
    unet = build_unet("sd15-inpaint", device="meta")
    registration = [k.rsplit(".processor", 1)[0] for k in unet.attn_processors if k.endswith("attn1.processor")]
    execution = [s.name for s in describe_sites(unet).of_kind("self")]
    assert sorted(registration) == sorted(execution)
    assert registration != execution  # diffusers registers mid after up
    assert execution[6].startswith("mid_block")


def test_sdxl_counts_and_levels():
    table = describe_sites(build_unet("sdxl-inpaint", device="meta"))
    selfs = table.of_kind("self")
    assert len(selfs) == 70 and len(table.of_kind("cross")) == 70
    assert {s.level for s in selfs} == {1, 2}
    assert [s.stage for s in selfs].count("mid") == 10


def test_grid_is_ceil_division():
    assert grid_at(0, (64, 96)) == (64, 96)
    assert grid_at(3, (64, 96)) == (8, 12)
    assert grid_at(2, (9, 13)) == (3, 4)


@pytest.mark.parametrize("size", [(64, 96), (72, 56)])
def test_grids_match_hidden_state_shapes_at_run_time(tiny_pipe, size):
    """Each site's predicted grid equals the token count its module really sees."""
    unet = tiny_pipe.unet
    table = describe_sites(unet)
    seen = {}
    hooks = [
        unet.get_submodule(s.name).register_forward_pre_hook(
            lambda m, args, kw, name=s.name: seen.__setitem__(name, args[0].shape[1] if args else kw["hidden_states"].shape[1]),
            with_kwargs=True,
        )
        for s in table
    ]
    latent = (size[0] // 8, size[1] // 8)
    with torch.no_grad():
        unet(torch.randn(1, 9, *latent), 10, encoder_hidden_states=torch.randn(1, 77, 32))
    for h in hooks:
        h.remove()
    for s in table:
        gh, gw = s.grid(latent)
        assert seen[s.name] == gh * gw, s.key


def test_unsupported_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="not a UNet with down/mid/up blocks"):
        describe_sites(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("arch", sorted(DIT_CONFIGS))
def test_transformer_site_table_matches_snapshot(arch):
    """The real configs' site tables (meta device), so recipes' layer lists are checked against the real depth."""
    from attnctl.backbones import find_backbone

    model = build_transformer(arch, device="meta")
    table = find_backbone(model).describe_sites(model)
    expected = (SNAPSHOTS / f"{arch}.txt").read_text()
    assert table.format((128, 128)) + "\n" == expected
    counts = {k: len(table.of_kind(k)) for k in ("joint", "single", "self")}
    assert counts == DIT_SITES[arch]


#: joint (dual-stream), single-stream and image-only self sites of each published transformer
DIT_SITES = {
    "sd3-medium": {"joint": 24, "single": 0, "self": 0},
    "sd35-medium": {"joint": 24, "single": 0, "self": 13},
    "sd35-large": {"joint": 38, "single": 0, "self": 0},
    "flux1-dev": {"joint": 19, "single": 38, "self": 0},
    "flux1-fill-dev": {"joint": 19, "single": 38, "self": 0},
}


@pytest.mark.parametrize("recipe,arch", [("harmonpaint-flux-fill", "flux1-fill-dev"), ("harmonpaint-sd3", "sd35-medium"),
                                         ("harmonpaint-sd3", "sd3-medium"), ("harmonpaint-sd3", "sd35-large")])
def test_transformer_recipes_resolve_on_the_real_depth(recipe, arch):
    """Each DiT recipe's selectors resolve on the published model they are meant for, to the sites documented."""
    import attnctl
    from attnctl.backbones import find_backbone
    from harmonpaint_recipe.loading import load_recipe, resolved
    from harmonpaint_recipe.runner import attach_config

    model = build_transformer(arch, device="meta")
    sites = find_backbone(model).describe_sites(model)
    plan = attnctl.compile_plan(attach_config(resolved(load_recipe(recipe))), sites, attnctl.StrategyManager.default())
    acting = {op.strategy: [] for ops in plan.site_ops.values() for op in ops}
    for name, ops in plan.site_ops.items():
        for op in ops:
            acting[op.strategy].append(sites.by_name(name).key)
    if arch.startswith("flux"):
        assert acting["sams"] == [f"joint[{i}]" for i in range(19)]
        assert acting["makvs"] == [f"single[{i}]" for i in range(30, 38)]
    else:
        joint = len(sites.of_kind("joint"))
        assert acting["sams"] == [f"joint[{i}]" for i in range(12)]
        assert acting["makvs"] == [f"joint[{i}]" for i in range(joint - 8, joint)]


def test_flux_names_stable_flows_vital_layers():
    from attnctl.backbones import find_backbone
    from attnctl.errors import SelectorError
    from attnctl.selectors import select_sites

    model = build_transformer("flux1-fill-dev", device="meta")
    table = find_backbone(model).describe_sites(model)
    vital = [s.key for s in select_sites("*@vital", table)]
    assert vital == ["joint[0]", "joint[1]", "joint[17]", "joint[18]", "single[6]", "single[9]", "single[34]",
                     "single[35]", "single[37]"]
    assert vital == [s.key for s in select_sites("*[0,1,17,18,25,28,53,54,56]", table)]
    assert [s.key for s in select_sites("single@vital", table)] == vital[4:]
    with pytest.raises(SelectorError, match=r"'@vitals' is neither a stage nor a named site set.*vital"):
        select_sites("*@vitals", table)
