"""region_mask (SAMS, Eq. 4-7): the fused fast path against the naive HW x HW reference."""

from __future__ import annotations

import pytest
import torch

import attnctl
from attnctl.attention import compute
from attnctl import ActiveOps, BatchLayout, ConfigError, Site, StrategyManager, describe_sites
from attnctl.sites import grid_at
from attnctl.testing import build_tiny_inpaint_pipeline
from reference_attention import (
    random_case,
    make_call,
    naive_sams,
    pipe_latents,
    sams_weights,
    set_naive,
    single_thread,
    site_masks,
    softmax_attention,
    tiny_inputs,
)
from strategies import region_mask
from strategies.region_mask import RegionMaskOp

_one_thread = pytest.fixture(autouse=True)(single_thread)

SITE = Site("down_blocks.0.attentions.0.transformer_blocks.0.attn1", "self", "down", 0, 0)
TOL = 1e-5


CASES = {
    "cfg-1img": (BatchLayout.for_pipeline(1, 1, cfg=True), (8, 8), [(2, 2, 6, 5)]),
    "no-cfg-2prompts-2masks": (BatchLayout.for_pipeline(2, 1, cfg=False), (8, 8), [(2, 2, 6, 5), (0, 4, 3, 8)]),
    "cfg-2per-prompt-nonsquare": (BatchLayout.for_pipeline(1, 2, cfg=True), (8, 12), [(1, 3, 7, 9), (4, 0, 8, 12)]),
    "empty-mask": (BatchLayout.for_pipeline(1, 1, cfg=True), (6, 10), [(0, 0, 0, 0)]),
}


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_fast_path_matches_naive_reference_on_random_tensors(case, renormalize):
    layout, hw, boxes = CASES[case]
    mask, q, k, v = random_case(layout, hw, boxes)
    _, call = make_call(SITE, mask, hw, layout, q, k, v, 16**-0.5)
    out = compute(call, ActiveOps(reweight=(RegionMaskOp("sams", site=SITE, tau=0.1, renormalize=renormalize),)))
    rows = site_masks(mask, hw, hw, list(layout.images))
    ref = naive_sams(q, k, v, rows, 0.1, 16**-0.5, renormalize)
    err = (out.double() - ref).abs().max().item()
    print(f"region_mask random {case} renormalize={renormalize}: max abs err {err:.2e}")
    assert out.shape == v.shape and out.dtype == torch.float32
    assert err <= TOL
    if case != "empty-mask":  # the op really reweights: the output is not plain attention
        plain = softmax_attention(q, k, 16**-0.5) @ v.double()
        assert (out.double() - plain).abs().max() > 1e-2


def test_empty_mask_at_coarse_grid_scales_attention_uniformly():
    """No masked token: M^ = tau/HW everywhere, so W is the constant (tau/HW)^2 + (1 - tau/HW)^2."""
    layout, hw, boxes = CASES["empty-mask"]
    mask, q, k, v = random_case(layout, hw, boxes)
    _, call = make_call(SITE, mask, hw, layout, q, k, v, 16**-0.5)
    out = compute(call, ActiveOps(reweight=(RegionMaskOp("sams", site=SITE, tau=0.1),)))
    e = 0.1 / 60
    plain = softmax_attention(q, k, 16**-0.5) @ v.double()
    assert (out.double() - (e**2 + (1 - e) ** 2) * plain).abs().max() <= TOL


def test_masked_queries_lose_background_mass_by_the_analytic_factor():
    """For a masked query, every background key's weight is multiplied by
    W_ob = M^_obj M^_bg + (1-M^_obj)(1-M^_bg) ~ tau; object keys by W_oo ~ (1-tau)^2 + tau^2."""
    layout, hw, tau = BatchLayout.for_pipeline(1, 1, cfg=False), (8, 8), 0.1
    mask, q, k, v = random_case(layout, hw, [(2, 2, 6, 6)], heads=1)
    m = mask.flatten(1)
    n = m.shape[-1]
    e = tau / n
    w_ob = (1 - tau + e) * e + (tau - e) * (1 - e)
    w_oo = (1 - tau + e) ** 2 + (tau - e) ** 2
    # naive path: the explicit maps
    a = softmax_attention(q, k, 16**-0.5)[0, 0]
    a_hat = sams_weights(m, tau)[0, 0] * a
    obj, bg = m[0].bool(), ~m[0].bool()
    ratio_bg = (a_hat[obj][:, bg].sum(-1) / a[obj][:, bg].sum(-1))
    ratio_obj = (a_hat[obj][:, obj].sum(-1) / a[obj][:, obj].sum(-1))
    print(f"SAMS tau={tau}: background mass ratio {ratio_bg.mean():.6f} (analytic {w_ob:.6f}), "
          f"object mass ratio {ratio_obj.mean():.6f} (analytic {w_oo:.6f})")
    assert torch.allclose(ratio_bg, torch.full_like(ratio_bg, w_ob), atol=1e-12)
    assert torch.allclose(ratio_obj, torch.full_like(ratio_obj, w_oo), atol=1e-12)
    assert abs(w_ob - tau) < 0.01
    # fast path: values = background indicator, so the output is each query's background mass
    indicator = (1 - m)[:, None, :, None].expand(1, 1, n, 16).contiguous()
    _, call = make_call(SITE, mask, hw, layout, q, k, indicator, 16**-0.5)
    mass = compute(call, ActiveOps(reweight=(RegionMaskOp("sams", site=SITE, tau=tau),)))[0, 0, :, 0]
    before = a[:, bg].sum(-1)
    fast_ratio = mass[obj].double() / before[obj]
    print(f"SAMS fast path background mass ratio {fast_ratio.mean():.6f}")
    assert torch.allclose(fast_ratio, torch.full_like(fast_ratio, w_ob), atol=1e-5)


def test_appended_keys_are_left_unweighted():
    """Composed with a key/value op, bank keys get weight M^_q + (1 - M^_q) = 1."""
    layout, hw, boxes = CASES["no-cfg-2prompts-2masks"]
    mask, q, k, v = random_case(layout, hw, boxes)
    g = torch.Generator().manual_seed(1)
    extra_k, extra_v = torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)
    _, call = make_call(SITE, mask, hw, layout, q, k, v, 16**-0.5)
    call.append_keys(extra_k, extra_v)
    out = compute(call, ActiveOps(reweight=(RegionMaskOp("sams", site=SITE, tau=0.1),)))
    rows = site_masks(mask, hw, hw, list(layout.images))
    w = torch.cat([sams_weights(rows, 0.1), torch.ones(2, 1, 64, 5, dtype=torch.float64)], dim=-1)
    a = softmax_attention(q, torch.cat([k, extra_k], 2), 16**-0.5)
    ref = (w * a) @ torch.cat([v, extra_v], 2).double()
    assert (out.double() - ref).abs().max() <= TOL


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_stays_close_to_the_reference(dtype, tol):
    layout, hw, boxes = CASES["cfg-2per-prompt-nonsquare"]
    mask, q, k, v = random_case(layout, hw, boxes)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    _, call = make_call(SITE, mask, hw, layout, q, k, v, 16**-0.5)
    out = compute(call, ActiveOps(reweight=(RegionMaskOp("sams", site=SITE, tau=0.1),)))
    ref = naive_sams(q, k, v, site_masks(mask, hw, hw, list(layout.images)), 0.1, 16**-0.5)
    err = (out.double() - ref).abs().max().item()
    print(f"region_mask {dtype}: max abs err {err:.2e}")
    assert out.dtype == dtype and err <= tol


TINY_CASES = {
    # name: (prompts, images per prompt, cfg, (height, width), boxes, sites)
    "cfg-default-sites": (["a cat"], 1, True, (64, 64), [(16, 20, 48, 44)], "self[2:7]"),
    "cfg-2per-prompt-all-sites": (["a dog"], 2, True, (64, 64), [(8, 8, 40, 56)], "self[0:16]"),
    "no-cfg-2masks-nonsquare": (["a cat", "a dog"], 1, False, (64, 96), [(16, 20, 48, 44), (0, 48, 40, 96)], "self[0:16]"),
}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_unet_matches_naive_processor(tiny_pipe, case):
    """One pipeline step: the UNet's noise prediction with the fast path vs the naive processor."""
    prompts, n_per, cfg, size, boxes, selector = TINY_CASES[case]
    image, masks, mask = tiny_inputs(*size, boxes)
    layout = BatchLayout.for_pipeline(len(prompts), n_per, cfg)
    _, (plain,) = pipe_latents(tiny_pipe, image, masks, prompts, n_per, cfg, size)
    config = {"strategies": {"sams": {"strategy": "region_mask", "sites": selector, "tau": 0.1}}}
    with attnctl.attach(tiny_pipe, config, StrategyManager()) as ctl:
        with ctl.run(layout, mask=mask):
            fast_latents, (fast,) = pipe_latents(tiny_pipe, image, masks, prompts, n_per, cfg, size)
    latent_hw = (size[0] // 8, size[1] // 8)

    def reference(site):
        rows = site_masks(mask, latent_hw, grid_at(site.level, latent_hw), list(layout.images))
        return lambda q, k, v, scale: naive_sams(q, k, v, rows, 0.1, scale)

    set_naive(tiny_pipe, selector, reference)
    naive_latents, (naive,) = pipe_latents(tiny_pipe, image, masks, prompts, n_per, cfg, size)
    err = (fast - naive).abs().max().item()
    print(f"region_mask tiny UNet {case}: max abs err {err:.2e} on the noise prediction "
          f"(|pred| max {naive.abs().max():.2f}), {(fast_latents - naive_latents).abs().max():.2e} on the "
          f"latents after the CFG step; effect vs plain {(fast - plain).abs().max():.2e}")
    assert fast.shape[0] == len(layout)
    assert err <= TOL
    assert (fast - plain).abs().max() > 1e-3


def test_parameters_defaults_and_errors():
    spec = region_mask.SPEC
    assert [(n, d) for n, _, d, _ in spec.parameter_table()] == [
        ("sites", "self[2:7]"), ("tau", 0.1), ("renormalize", False)
    ]
    sites = describe_sites(build_tiny_inpaint_pipeline(0).unet)
    manager = StrategyManager(plugins=[region_mask], autoload=False)
    plan = attnctl.compile_plan({"strategies": {"region_mask": {}}}, sites, manager)
    assert sorted(sites.by_name(n).index for n in plan.site_ops) == [2, 3, 4, 5, 6]
    with pytest.raises(ConfigError, match="tau must be in"):
        attnctl.compile_plan({"strategies": {"region_mask": {"tau": 1.5}}}, sites, manager)
    with pytest.raises(ConfigError, match="cross-attention"):
        attnctl.compile_plan({"strategies": {"region_mask": {"sites": "cross[0:2]"}}}, sites, manager)


def test_registered_through_entry_points():
    strategies = StrategyManager().strategies()
    assert "region_mask" in strategies and "kv_bank" in strategies
    assert strategies["region_mask"].params is region_mask.RegionMaskParams
