"""style_aligned (StyleAligned: AdaIN of Q/K + shared attention to a reference row) vs naive references.

The naive references are written from the equations of their code, in float64 with an
explicit softmax: AdaIN per row, head and channel over tokens with the **unbiased** variance
and eps inside the sqrt, every row's keys/values extended by the reference row's (keys
scaled by ``shared_score_scale`` except on the reference row itself), and
``shared_score_shift`` added to the logits of the appended keys on every row. The
pipeline-level reference runs the stock pipeline with the reference prompt first, so the
reference is row 0 of each CFG half, exactly as their processor slices the batch.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from PIL import Image

import attnctl
from attnctl import ActiveOps, BatchLayout, ConfigError, Site, StrategyManager, describe_sites
from attnctl.attention import compute
from attnctl.rows import RowOp
from attnctl.sites import SiteTable
from attnctl.testing import build_tiny_inpaint_pipeline
from reference_attention import make_call, random_case, sams_weights, set_naive, single_thread, site_masks, tiny_inputs
from strategies import kv_bank, region_mask, style_aligned
from strategies.kv_bank import KvBankOp
from strategies.region_mask import RegionMaskOp

_one_thread = pytest.fixture(autouse=True)(single_thread)

SITE = Site("up_blocks.3.attentions.0.transformer_blocks.0.attn1", "self", "up", 8, 0)
TOL = 1e-5
SCALE = 16**-0.5
REF = "ref"
# [u_main0, u_main1, c_main0, c_main1, u_ref, c_ref]: the reference rows follow the main ones
LAYOUT = BatchLayout(("uncond", "uncond", "cond", "cond", "uncond", "cond"), (0, 1, 0, 1, 0, 0),
                     (0, 0, 0, 0, 0, 1), ("main",) * 4 + (REF, REF))
REF_OF = [4, 4, 5, 5, 4, 5]  # each row's reference: same CFG branch


# ----------------------------------------------------------------------------- naive references
def naive_adain(x: torch.Tensor, refs: list[int], unbiased: bool = True, eps_inside: bool = True) -> torch.Tensor:
    """AdaIN of every row of ``x`` [B, h, N, d] against row ``refs[r]``, over tokens (float64)."""
    x = x.double()
    mean, var = x.mean(dim=-2, keepdim=True), x.var(dim=-2, keepdim=True, unbiased=unbiased)
    std = (var + 1e-5).sqrt() if eps_inside else var.sqrt() + 1e-5
    return (x - mean) / std * std[refs] + mean[refs]


def naive_shared(q, k, v, refs: list[int], is_ref: list[bool], scale: float, adain=(True, True, False),
                 score_scale: float = 1.0, shift: float = 0.0, extra=None, **adain_kw) -> torch.Tensor:
    """Their shared attention, one explicit softmax per row over ``[K_r ; s_r K_ref ; extra keys]``.

    ``extra(q, k, v, r)`` may return more keys, values and weights on own keys ``(K+, V+, W)`` per
    row (another strategy at the site, computed from the AdaIN-ed tensors).
    """
    q, k, v = (naive_adain(x, refs, **adain_kw) if on else x.double() for x, on in zip((q, k, v), adain))
    n = k.shape[-2]
    zeros = lambda m: torch.zeros(m, dtype=torch.float64)  # noqa: E731
    outs = []
    for r, ref in enumerate(refs):
        s = 1.0 if is_ref[r] else score_scale
        keys, values, bias = [k[r], s * k[ref]], [v[r], v[ref]], [zeros(n), zeros(n) + shift]
        w_own = torch.ones(n, n, dtype=torch.float64)
        if extra is not None:
            k_plus, v_plus, w_own = extra(q, k, v, r)
            keys, values, bias = keys + [k_plus], values + [v_plus], bias + [zeros(k_plus.shape[-2])]
        logits = q[r] @ torch.cat(keys, -2).transpose(-1, -2) * scale + torch.cat(bias)
        a = logits.softmax(dim=-1)
        w = torch.ones(a.shape[-2:], dtype=torch.float64)
        w[:, :n] = w_own  # a reweighting of the own keys; every appended key keeps weight 1
        outs.append((w * a) @ torch.cat(values, -2))
    return torch.stack(outs)


def _case(hw=(6, 8), seed=0, main_spread=1.0):
    """Random q/k/v for LAYOUT; the reference rows get other token statistics than the main ones."""
    mask, q, k, v = random_case(LAYOUT, hw, [(1, 1, 4, 5), (2, 3, 6, 8)], seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    shift_ref = torch.randn(1, 2, 1, 16, generator=g)
    for x in (q, k, v):
        x[:4] *= main_spread
        x[4:] = 1.5 * x[4:] + 0.5 * shift_ref
    return mask, q, k, v


def _ops(instance: str, **params) -> list:
    """The plugin's planned site ops for one site (the row op is checked on its own)."""
    p = style_aligned.SPEC.params(reference_prompt="a painting", **params)
    planned = style_aligned.attnctl_plan(instance, style_aligned.SPEC, p, SiteTable([SITE]))
    assert isinstance(planned[0], RowOp) and planned[0].row.role == instance and planned[0].row.per_image is False
    return planned[1:]


SITE_CASES = {
    "defaults": {},
    "score-scale": {"shared_score_scale": 1.3},
    "shift-log2": {"shared_score_shift": math.log(2)},
    "scale-shift-adain-values": {"shared_score_scale": 0.7, "shared_score_shift": 0.4, "adain_values": True},
    "no-adain": {"adain_queries": False, "adain_keys": False},
}


@pytest.mark.parametrize("case", list(SITE_CASES))
def test_site_matches_naive_shared_attention(case):
    params = SITE_CASES[case]
    mask, q, k, v = _case()
    _, call = make_call(SITE, mask, (6, 8), LAYOUT, q, k, v, SCALE)
    ops = _ops(REF, **params)
    out = compute(call, ActiveOps.of(ops))
    adain = (params.get("adain_queries", True), params.get("adain_keys", True), params.get("adain_values", False))
    ref = naive_shared(q, k, v, REF_OF, [r >= 4 for r in range(6)], SCALE, adain,
                       params.get("shared_score_scale", 1.0), params.get("shared_score_shift", 0.0))
    err = (out.double() - ref).abs().max().item()
    print(f"style_aligned site {case}: max abs err {err:.2e}; keys {call.key.shape[-2]}; bias {call.bias is not None}")
    assert err <= TOL
    assert call.key.shape[-2] == 2 * 48 and (call.bias is None) == ("shift" not in case)
    # the reference rows' output is their plain self-attention (duplicated keys change nothing)
    plain = (q[4:].double() @ k[4:].double().transpose(-1, -2) * SCALE).softmax(-1) @ v[4:].double()
    assert (out[4:].double() - plain).abs().max().item() <= TOL
    main_plain = torch.nn.functional.scaled_dot_product_attention(q[:4], k[:4], v[:4], scale=SCALE)
    assert (out[:4] - main_plain).abs().max() > 1e-2  # the main rows do change


def test_adain_uses_the_unbiased_variance_with_eps_inside_the_sqrt():
    """Main rows with token variance ~eps: biased var or eps outside the sqrt give visibly other outputs."""
    mask, q, k, v = _case(hw=(4, 4), main_spread=3e-3)
    _, call = make_call(SITE, mask, (4, 4), LAYOUT, q, k, v, SCALE)
    out = compute(call, ActiveOps.of(_ops(REF))).double()
    is_ref = [r >= 4 for r in range(6)]
    exact = naive_shared(q, k, v, REF_OF, is_ref, SCALE)
    biased = naive_shared(q, k, v, REF_OF, is_ref, SCALE, unbiased=False)
    outside = naive_shared(q, k, v, REF_OF, is_ref, SCALE, eps_inside=False)
    err, d_biased, d_outside = ((out - x).abs().max().item() for x in (exact, biased, outside))
    print(f"style_aligned AdaIN: err {err:.2e}; biased var off by {d_biased:.2e}, eps outside by {d_outside:.2e}")
    assert err <= TOL and d_biased > 100 * TOL and d_outside > 100 * TOL


def test_a_single_token_site_skips_adain():
    """One token has no unbiased variance (NaN in their code); the site then only shares attention."""
    mask, q, k, v = _case(hw=(1, 1))
    _, call = make_call(SITE, mask, (1, 1), LAYOUT, q, k, v, SCALE)
    out = compute(call, ActiveOps.of(_ops(REF, shared_score_scale=1.3))).double()
    ref = naive_shared(q, k, v, REF_OF, [r >= 4 for r in range(6)], SCALE, (False, False, False), 1.3)
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 6e-2), (torch.float16, 8e-3)])
def test_half_precision_stays_close_to_the_reference(dtype, tol):
    """Half precision (AdaIN statistics in fp32, Q/K rounded back; |out| up to ~4.4 here)."""
    mask, *qkv = _case()
    q, k, v = (t.to(dtype) for t in qkv)
    _, call = make_call(SITE, mask, (6, 8), LAYOUT, q, k, v, SCALE)
    out = compute(call, ActiveOps.of(_ops(REF, shared_score_scale=1.2, shared_score_shift=math.log(2))))
    ref = naive_shared(q, k, v, REF_OF, [r >= 4 for r in range(6)], SCALE, score_scale=1.2, shift=math.log(2))
    err = (out.double() - ref).abs().max().item()
    print(f"style_aligned {dtype}: max abs err {err:.2e}")
    assert out.dtype == dtype and err <= tol


# ----------------------------------------------------------------------------- composition
def _makvs_extra(mask_rows: torch.Tensor, lam: float, tau: float | None):
    """kv_bank (Eq. 10-11) on the AdaIN-ed own keys of each row, and region_mask's W (Eq. 4-7) if ``tau``."""
    def extra(q, k, v, r):
        keep = (1 - mask_rows[r].double())[None, :, None]
        k_bar, v_bar = ((keep * x[r]).sum(1, keepdim=True) / keep.sum() for x in (k, v))
        k_t, v_t = torch.where(keep > 0, k[r], k_bar), torch.where(keep > 0, v[r], v_bar)
        n = k.shape[-2]
        w = sams_weights(mask_rows[r : r + 1], tau)[0, 0] if tau is not None else torch.ones(n, n, dtype=torch.float64)
        return lam * k_t, v_t, w
    return extra


@pytest.mark.parametrize("with_region_mask", [False, True])
def test_composes_with_kv_bank_and_order_of_names_does_not_matter(with_region_mask):
    """style_aligned's bank + kv_bank's (MAKVS) at one site (+ region_mask): both banks keep weight 1."""
    mask, q, k, v = _case(seed=3)
    rows = site_masks(mask, (6, 8), (6, 8), list(LAYOUT.images))
    outs = []
    for style_name in ("a_style", "z_style"):  # sorts before / after "makvs"
        layout = BatchLayout(LAYOUT.branches, LAYOUT.images, LAYOUT.prompts, ("main",) * 4 + (style_name,) * 2)
        _, call = make_call(SITE, mask, (6, 8), layout, q, k, v, SCALE)
        ops = _ops(style_name, shared_score_scale=1.2, shared_score_shift=0.3)
        ops.append(KvBankOp("makvs", site=SITE, scale=1.4))
        if with_region_mask:
            ops.append(RegionMaskOp("sams", site=SITE, tau=0.1))
        ops.sort(key=lambda op: (type(op).stage, op.strategy))  # the plan's canonical order
        outs.append(compute(call, ActiveOps.of(ops)).double())
    extra = _makvs_extra(rows, 1.4, 0.1 if with_region_mask else None)
    ref = naive_shared(q, k, v, REF_OF, [r >= 4 for r in range(6)], SCALE, score_scale=1.2, shift=0.3, extra=extra)
    errs = [(o - ref).abs().max().item() for o in outs]
    print(f"style_aligned + kv_bank (region_mask {with_region_mask}): errs {errs}")
    assert max(errs) <= TOL and (outs[0] - outs[1]).abs().max().item() <= TOL


# ----------------------------------------------------------------------------- whole pipeline
MAIN_PROMPT, REF_PROMPT, STEPS, SEED = "a red cube", "a blue ball", 3, 7


def authors_processor_core(params: dict):
    """Their processor's core on the stock batch ``[u_ref, u_m..., c_ref, c_m...]``: reference = row 0 of each half."""
    def core(q, k, v, scale):
        b = q.shape[0]
        refs = [0] * (b // 2) + [b // 2] * (b // 2)
        adain = (params.get("adain_queries", True), params.get("adain_keys", True), params.get("adain_values", False))
        return naive_shared(q, k, v, refs, [r in (0, b // 2) for r in range(b)], scale, adain,
                            params.get("shared_score_scale", 1.0), params.get("shared_score_shift", 0.0))
    return core


def authors_shared_norm(unet) -> None:
    """Their register_shared_norm on every GroupNorm: normalize ``concat_first(x, dim=-2)`` (each half's
    row 0 appended along the height), keep the first ``n`` rows of that axis."""
    for norm in [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]:
        def forward(x, norm=norm, original=norm.forward):
            b, n = x.shape[0], x.shape[-2]
            style = torch.stack((x[0], x[b // 2])).unsqueeze(1).expand(2, b // 2, *x.shape[1:]).reshape(*x.shape)
            return original(torch.cat((x, style), dim=-2))[..., :n, :]
        norm.forward = forward


def _pipe_kwargs(image, mask, prompt, latents, n_per=1):
    return dict(prompt=prompt, image=image, mask_image=mask, height=128, width=128, num_inference_steps=STEPS,
                guidance_scale=7.5, num_images_per_prompt=n_per, output_type="latent", latents=latents,
                generator=torch.Generator().manual_seed(0))


PIPE_CASES = {  # name: (params, dtype, tolerance on the final latents)
    "defaults-all-sites": ({}, torch.float64, TOL),
    "scale-shift-some-sites": ({"sites": "self[2:9]", "shared_score_scale": 1.2, "shared_score_shift": math.log(2),
                                "adain_values": True}, torch.float64, TOL),
    # fp32: the stock pipeline itself differs by ~2e-5 here from an explicit-softmax processor
    "defaults-fp32": ({}, torch.float32, 1e-4),
    "no-group-norm-sharing": ({"share_group_norm": False}, torch.float64, TOL),  # their SDXL demo's setting
}


@pytest.mark.parametrize("case", list(PIPE_CASES))
def test_tiny_pipeline_matches_the_authors_batch(tiny_pipe, case):
    """3 DDIM steps, 2 images + the reference: final latents of the images and of the reference.

    128x128 pixels: every site has >= 2x2 tokens, so their unbiased variance is defined
    everywhere. The exact comparison runs in float64. In fp32, 3 steps of this random tiny
    UNet turn SDPA-vs-explicit-softmax rounding into ~2e-5 on the final latents (the stock
    pipeline against a plain explicit-softmax processor differs as much), so the fp32 case
    is checked at 1e-4.
    """
    from diffusers import DDIMScheduler

    params, dtype, tol = PIPE_CASES[case]
    pipe = tiny_pipe.to(dtype)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image, (mask,), _ = tiny_inputs(128, 128, [(32, 40, 96, 88)])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    config = {"strategies": {"style": {"strategy": "style_aligned", "reference_prompt": REF_PROMPT,
                                       "reference_seed": SEED, "keep_reference": True, **params}}}
    with attnctl.attach(pipe, config) as ctl:
        layout = BatchLayout.for_call(pipe, prompt=MAIN_PROMPT, num_images_per_prompt=2, guidance_scale=7.5)
        with ctl.run(layout) as state:
            ours = pipe(**_pipe_kwargs(image, mask, MAIN_PROMPT, z, n_per=2)).images
    assert state.layout.roles == ("main",) * 4 + ("style",) * 2
    reference = state.row_outputs["style"]

    # stock pipeline, reference prompt first; its noise drawn as RowSpec.noise_seed draws it
    ref_noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(SEED), dtype=torch.float32)
    stock_unet = pipe.unet
    pipe.unet = copy.deepcopy(stock_unet)
    set_naive(pipe, params.get("sites", "self"), lambda site: authors_processor_core(params))
    if params.get("share_group_norm", True):
        authors_shared_norm(pipe.unet)
    try:
        naive = pipe(**_pipe_kwargs(image, mask, [REF_PROMPT, MAIN_PROMPT, MAIN_PROMPT],
                                    torch.cat([ref_noise.to(dtype), z]))).images
    finally:
        pipe.unet = stock_unet
    plain = pipe(**_pipe_kwargs(image, mask, MAIN_PROMPT, z, n_per=2)).images
    err_main, err_ref = (ours - naive[1:]).abs().max().item(), (reference[0] - naive[0]).abs().max().item()
    print(f"style_aligned tiny pipeline {case}: main {err_main:.2e}, reference {err_ref:.2e}; "
          f"effect vs plain {(ours - plain).abs().max():.2e} (|latent| max {naive.abs().max():.1f})")
    assert ours.dtype == dtype and err_main <= tol and err_ref <= tol
    assert (ours - plain).abs().max() > 1e-2
    if case == "defaults-all-sites":  # control: their attention alone, without the shared group norms, is another image
        pipe.unet = copy.deepcopy(stock_unet)
        set_naive(pipe, "self", lambda site: authors_processor_core(params))
        try:
            unshared = pipe(**_pipe_kwargs(image, mask, [REF_PROMPT, MAIN_PROMPT, MAIN_PROMPT],
                                           torch.cat([ref_noise.to(dtype), z]))).images
        finally:
            pipe.unet = stock_unet
        assert (ours - unshared[1:]).abs().max() > 1e-2


def test_real_reference_matches_their_transfer_notebook(tiny_pipe, tmp_path):
    """Their transfer flow in float64: the reference inverted with its prompt at guidance 2, row 0 set to
    ``zts[offset]`` at the start and to ``zts[max(offset + 1, i + 1)]`` after each step i (their callback)."""
    from diffusers import DDIMScheduler
    from reference_inversion import literal_inversion

    from attnctl.row_inputs import encode_image

    steps, offset = 4, 2
    pipe = tiny_pipe.to(torch.float64)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image, (mask,), _ = tiny_inputs(128, 128, [(32, 40, 96, 88)])
    image.transpose(0).save(tmp_path / "reference.png")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).to(torch.float64)

    def kwargs(**over):  # a fresh generator per call: the masked image's latents are drawn from it
        return {**_pipe_kwargs(image, mask, MAIN_PROMPT, z), "num_inference_steps": steps, **over}

    config = {"strategies": {"style": {"strategy": "style_aligned", "reference_prompt": REF_PROMPT,
                                       "reference_image": str(tmp_path / "reference.png"), "inversion_offset": offset,
                                       "shared_score_shift": math.log(2)}}}
    extra = []
    with attnctl.attach(pipe, config) as ctl:
        hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: extra.append((a[0] if a else kw["sample"]).clone()),
                                                   with_kwargs=True)
        with ctl.run(BatchLayout.for_call(pipe, prompt=MAIN_PROMPT, guidance_scale=7.5)):
            ours = pipe(**kwargs()).images
        hook.remove()
    z0 = encode_image(pipe, Image.open(tmp_path / "reference.png"), (16, 16), "style")
    zts = literal_inversion(pipe, z0, extra[-1][1:2, 4:], REF_PROMPT, 2.0)[::-1]  # flipped, as theirs

    def callback(p, i, t, kw):
        kw["latents"][0] = zts[max(offset + 1, i + 1)]
        return {"latents": kw["latents"]}

    stock_unet = pipe.unet
    pipe.unet = copy.deepcopy(stock_unet)
    params = {"shared_score_shift": math.log(2)}
    set_naive(pipe, "self", lambda site: authors_processor_core(params))
    authors_shared_norm(pipe.unet)  # their transfer notebook shares the group norms
    try:
        naive = pipe(**kwargs(prompt=[REF_PROMPT, MAIN_PROMPT], latents=torch.cat([zts[offset], z]),
                              callback_on_step_end=callback)).images
    finally:
        pipe.unet = stock_unet
    err = (ours - naive[1:]).abs().max().item()
    print(f"style_aligned real reference: main {err:.2e} (|latent| max {naive.abs().max():.1f})")
    assert err <= TOL
    # control: the offset matters (the plain trajectory gives another image)
    config["strategies"]["style"]["inversion_offset"] = 0
    with attnctl.attach(pipe, config) as ctl:
        with ctl.run(BatchLayout.for_call(pipe, prompt=MAIN_PROMPT, guidance_scale=7.5)):
            other = pipe(**kwargs()).images
    assert (other - ours).abs().max() > 1e-3


def test_parameters_registration_and_errors():
    assert StrategyManager().strategies()["style_aligned"].params is style_aligned.StyleAlignedParams
    sites = describe_sites(build_tiny_inpaint_pipeline(0).unet)
    manager = StrategyManager(plugins=[style_aligned, kv_bank, region_mask], autoload=False)
    plan = attnctl.compile_plan({"strategies": {"s": {"strategy": "style_aligned", "reference_prompt": "x"}}},
                                sites, manager)
    assert len(plan.site_ops) == len(sites.of_kind("self")) and plan.rows[0][1].role == "s"
    assert all(op.passes == frozenset({"main"}) for ops in plan.site_ops.values() for op in ops)
    for bad, message in [({}, r"strategies\.s: reference_prompt is empty"),
                         ({"reference_prompt": "x", "sites": "cross"}, "cross-attention"),
                         ({"reference_prompt": "x", "shared_score_shift": float("inf")}, "shared_score_shift")]:
        with pytest.raises(ConfigError, match=message):
            attnctl.compile_plan({"strategies": {"s": {"strategy": "style_aligned", **bad}}}, sites, manager)
