"""Strategies on a transformer's joint attention (SD3, FLUX): identity, exactness against the full joint matrix."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl import BatchLayout, StrategyManager
from attnctl.backbones import find_backbone
from attnctl.errors import ConfigError
from reference_attention import site_masks
from reference_joint import JointCase, NaiveJointAttention, flux_inputs, sd3_inputs, tiny_flux, tiny_sd3

GRID = (4, 6)  # FLUX tokens; the latent is twice that (2x2 packing)
LATENT = (8, 12)


def box_mask() -> torch.Tensor:
    mask = torch.zeros(*LATENT)
    mask[2:6, 3:9] = 1.0
    return mask


def token_masks(rows: int) -> torch.Tensor:
    return site_masks(box_mask()[None, None], LATENT, GRID, list(range(rows)))


FAMILIES = {
    "flux": (tiny_flux, lambda dtype: flux_inputs(GRID, dtype=dtype), ("txt", "img"), 7, 1, False),
    "sd3": (tiny_sd3, lambda dtype: sd3_inputs(LATENT, dtype=dtype), ("img", "txt"), 5, 2, True),
}


def run_attached(model, config, inputs, cfg: bool):
    layout = BatchLayout.for_pipeline(1, cfg=cfg)
    with attnctl.attach(model, config) as ctl, ctl.run(layout, mask=box_mask()), torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_idle_attach_is_bit_identical(family):
    make, inputs, _, _, _, cfg = FAMILIES[family]
    model = make()
    with torch.no_grad():
        stock = model(**inputs(torch.float32))[0]
    with attnctl.attach(model, {}, manager=StrategyManager(autoload=False)) as ctl:
        with torch.no_grad():
            attached = model(**inputs(torch.float32))[0]
        with ctl.run(BatchLayout.for_pipeline(1, cfg=cfg), mask=box_mask()), torch.no_grad():
            in_run = model(**inputs(torch.float32))[0]
    assert torch.equal(stock, attached) and torch.equal(stock, in_run)


def test_site_tables_hold_joint_and_single_sites_with_blocks():
    flux = find_backbone(tiny_flux()).describe_sites(tiny_flux())
    assert [s.key for s in flux] == ["joint[0]", "joint[1]", "single[0]", "single[1]"]
    assert all(s.sequence == ("txt", "img") and "img>txt" in s.blocks and s.level == 1 for s in flux)
    sd3 = find_backbone(tiny_sd3()).describe_sites(tiny_sd3())
    assert [(s.key, s.name) for s in sd3] == [
        ("joint[0]", "transformer_blocks.0.attn"), ("self[0]", "transformer_blocks.0.attn2"),
        ("joint[1]", "transformer_blocks.1.attn")]
    assert sd3[1].blocks == ("img>img",) and sd3[0].sequence == ("img", "txt")
    text = flux.format(LATENT)
    assert "single[1]  single level=1  4x6  single_transformer_blocks.1.attn" in text and "img>txt" in text


CASES = {
    "sams": ({"strategy": "region_mask", "tau": 0.1}, dict(tau=0.1)),
    "makvs": ({"strategy": "kv_bank", "scale": 1.4}, dict(lam=1.4)),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", [["sams"], ["makvs"], ["sams", "makvs"]], ids=["sams", "makvs", "sams+makvs"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-5)], ids=["fp64", "fp32"])
def test_strategies_match_the_full_joint_matrix(family, which, dtype, tol):
    """Every site (joint, single, SD3.5's image-only attn2) against the explicit joint softmax, text rows included.

    float64 stops at ~1e-9: the masks (and so the SAMS factors) are fp32 by the core's contract."""
    make, inputs, order, text, rows, cfg = FAMILIES[family]
    model = make(dtype=dtype)
    config = {"strategies": {name: {**CASES[name][0], "sites": "*"} for name in which}}
    fast = run_attached(model, config, inputs(dtype), cfg)
    case = JointCase(order, text, token_masks(rows), **{k: v for name in which for k, v in CASES[name][1].items()})
    with NaiveJointAttention(case) as naive, torch.no_grad():
        reference = model(**inputs(dtype))[0]
    assert naive.calls == len(find_backbone(model).describe_sites(model))
    with torch.no_grad():
        stock = model(**inputs(dtype))[0]
    assert (reference - stock).abs().max() > 1e-3  # the control: the strategies change the output
    assert (fast - reference).abs().max() <= tol


def test_text_rows_are_untouched():
    """Ops change only the image queries' rows: at one joint site the text stream's output stays stock."""
    model = tiny_flux(dtype=torch.float64)
    seen = {}
    block = model.transformer_blocks[1]
    hook = block.register_forward_hook(lambda m, a, out: seen.setdefault("out", []).append(out))
    with torch.no_grad():
        model(**flux_inputs(GRID, dtype=torch.float64))
    config = {"strategies": {"sams": {"strategy": "region_mask", "sites": "joint[1]", "tau": 0.0}}}
    run_attached(model, config, flux_inputs(GRID, dtype=torch.float64), cfg=False)
    hook.remove()
    (stock_text, stock_image), (text, image) = seen["out"]
    assert (text - stock_text).abs().max() < 1e-12
    assert (image - stock_image).abs().max() > 1e-3


def test_selectors_on_a_transformer():
    from attnctl.selectors import select_sites

    sites = find_backbone(tiny_flux()).describe_sites(tiny_flux())
    assert [s.key for s in select_sites("*[0,3]", sites)] == ["joint[0]", "single[1]"]
    assert [s.key for s in select_sites("self[-1:]", sites)] == ["single[1]"]  # every site has img>img
    assert [s.key for s in select_sites("joint:img>txt,single[0]", sites)] == ["joint[0]", "joint[1]", "single[0]"]
    sd3 = find_backbone(tiny_sd3()).describe_sites(tiny_sd3())
    assert [s.key for s in select_sites("cross", sd3)] == ["joint[0]", "joint[1]"]  # attn2 holds no text
    assert [s.key for s in select_sites("self", sd3)] == ["joint[0]", "self[0]", "joint[1]"]


def test_an_op_not_written_for_joint_sites_is_refused_there():
    from toy_strategies import ScalePlugin

    manager = StrategyManager(plugins=[ScalePlugin()], autoload=False)
    with pytest.raises(ConfigError, match=r"not written for joint sites"):
        attnctl.attach(tiny_flux(), {"strategies": {"s": {"strategy": "toy_scale", "sites": "joint[0]"}}},
                       manager=manager)


def test_rotation_helpers_are_fluxs_and_invert_exactly():
    from diffusers.models.embeddings import apply_rotary_emb

    from strategies._rotary import rotate, unrotate

    model = tiny_flux(dtype=torch.float64)
    inputs = flux_inputs(GRID, dtype=torch.float64)
    cos, sin = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
    x = torch.randn(1, 2, cos.shape[0], cos.shape[1], dtype=torch.float64)
    assert torch.allclose(rotate(x, cos, sin).double(), apply_rotary_emb(x, (cos, sin)), atol=1e-6)
    # exact up to the embedding itself: cos^2 + sin^2 is 1 to its own (fp32) rounding
    assert (unrotate(rotate(x, cos, sin), cos, sin) - x).abs().max() < 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_bank_at_positions_is_eq10_with_rotated_keys(family):
    """rope: positions takes the unmasked keys' mean at position 0 and turns it to each masked token (FLUX);
    on SD3 (no rotary positions) it is the plain masked mean."""
    make, inputs, order, text, rows, cfg = FAMILIES[family]
    model = make(dtype=torch.float64)
    args = inputs(torch.float64)
    config = {"strategies": {"makvs": {"strategy": "kv_bank", "sites": "*", "scale": 1.4, "rope": "positions"}}}
    fast = run_attached(model, config, args, cfg)
    rotary = model.pos_embed(torch.cat([args["txt_ids"], args["img_ids"]])) if family == "flux" else None
    case = JointCase(order, text, token_masks(rows), lam=1.4, rotary=rotary)
    with NaiveJointAttention(case), torch.no_grad():
        reference = model(**args)[0]
    assert (fast - reference).abs().max() < 1e-8
    rotated = run_attached(model, {"strategies": {"makvs": {**config["strategies"]["makvs"], "rope": "rotated"}}},
                           args, cfg)
    if family == "flux":
        assert (rotated - fast).abs().max() > 1e-3  # the control: the two readings differ where keys rotate
    else:
        assert (rotated - fast).abs().max() < 1e-10


@pytest.mark.parametrize("recipe", ["masactrl", "style-aligned", "p2p-replace", "pag", "reference-only",
                                    "attentive-eraser", "hd-painter", "visual-style-prompting", "attend-excite"])
def test_unet_recipes_of_other_methods_are_refused_on_a_transformer(recipe):
    """Their selectors name UNet stages and grids, or their ops need UNet machinery: refused with a message."""
    from harmonpaint_recipe.loading import load_recipe, resolved
    from harmonpaint_recipe.runner import attach_config

    with pytest.raises(attnctl.errors.AttnctlError, match=r"matches no attention site|strategies\.\w+|give sites"):
        attnctl.attach(tiny_flux(), attach_config(resolved(load_recipe(recipe))))


def _row(instance, sites):
    from attnctl.rows import RowOp, RowSpec

    return [RowOp(instance, row=RowSpec(role="source"))]


def _prediction(instance, sites):
    from attnctl.step_ops import PredictionOp

    return [PredictionOp(instance)]


@pytest.mark.parametrize("make,what", [(_row, "add rows to the batch"), (_prediction, "act around the scheduler step")])
def test_unet_only_machinery_is_refused_by_name_on_a_transformer(make, what):
    from toy_strategies import FactoryPlugin

    manager = StrategyManager(plugins=[FactoryPlugin(make)], autoload=False)
    with pytest.raises(ConfigError, match=rf"strategies\.mine {what}.*transformer"):
        attnctl.attach(tiny_flux(), {"strategies": {"mine": {"strategy": "toy_ops"}}}, manager=manager)


def test_a_plugin_adds_a_backbone_for_a_network_attnctl_does_not_know():
    from diffusers import FluxTransformer2DModel

    from attnctl.backbones import FluxBackbone

    class MyFlux(FluxTransformer2DModel):
        """A user's subclass: another class name, so no built-in backbone claims it."""

    class MyFluxBackbone(FluxBackbone):
        name, classes = "my-flux", ("MyFlux",)

    class Plugin:
        @attnctl.hookimpl
        def attnctl_add_backbones(self):
            return [MyFluxBackbone()]

    torch.manual_seed(0)
    model = MyFlux(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1,
                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                   axes_dims_rope=[4, 4, 8]).eval()
    with pytest.raises(attnctl.errors.UnsupportedModelError, match=r"no backbone for it; it knows .*Flux"):
        attnctl.attach(model, {}, manager=StrategyManager(autoload=False))
    with attnctl.attach(model, {}, manager=StrategyManager(plugins=[Plugin()], autoload=False)) as ctl:
        assert ctl.backbone.name == "my-flux" and [s.key for s in ctl.sites] == ["joint[0]", "single[0]"]


def test_sams_on_a_joint_site_is_two_fused_terms_text_keys_folded_in():
    """SAMS's factors sum to 1 per query, so the text keys' weight 1 folds into its two terms: the image
    queries' one SDPA call has values 2 x head width, not 3 x (and the result stays exact, above)."""
    from torch.overrides import TorchFunctionMode

    class Widths(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.widths = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.nn.functional.scaled_dot_product_attention:
                self.widths.append(args[2].shape[-1] if len(args) > 2 else kwargs["value"].shape[-1])
            return func(*args, **kwargs)

    model = tiny_flux()
    config = {"strategies": {"sams": {"strategy": "region_mask", "sites": "joint[0]", "tau": 0.1}}}
    with Widths() as seen:
        run_attached(model, config, flux_inputs(GRID), cfg=False)
    assert max(seen.widths) == 2 * 16  # head width 16


@pytest.mark.parametrize("sequence", [("txt", "img"), ("img", "txt")])
def test_a_joint_call_with_the_modules_own_mask_keeps_it(sequence):
    """A mask the processor passes (boolean or additive, per query) reaches both the image and the text rows."""
    from types import SimpleNamespace

    from attnctl.joint import joint_compute
    from attnctl.ops import ActiveOps
    from attnctl.sites import Site

    site = Site("x", "joint", "joint", 0, 1, sequence=sequence)
    state = SimpleNamespace(tokens=(3, 5), rows=(0,))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g, dtype=torch.float64) for _ in range(3))
    allowed = torch.rand(1, 1, 8, 8, generator=g) > 0.3
    allowed[..., 0] = True
    for mask in (allowed, torch.zeros(1, 1, 8, 8, dtype=torch.float64).masked_fill(~allowed, float("-inf"))):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert (joint_compute(site, state, ActiveOps(), q, k, v, mask, 0.5, True, None) - expected).abs().max() < 1e-12
