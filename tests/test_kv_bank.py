"""kv_bank (MAKVS, Eq. 10-12, and the ``row`` source): compact fast path vs all-2HW-keys reference."""

from __future__ import annotations

import warnings

import pytest
import torch

import attnctl
from attnctl.attention import compute
from attnctl import ActiveOps, BatchLayout, ConfigError, InputError, Site, StrategyManager, describe_sites
from attnctl.sites import grid_at
from attnctl.testing import build_tiny_inpaint_pipeline
from reference_attention import (
    random_case,
    make_call,
    makvs_bank,
    naive_makvs,
    naive_row_bank,
    pipe_latents,
    set_naive,
    single_thread,
    site_masks,
    softmax_attention,
    tiny_inputs,
)
from strategies import kv_bank
from strategies.kv_bank import KvBankOp

_one_thread = pytest.fixture(autouse=True)(single_thread)

SITE = Site("up_blocks.3.attentions.0.transformer_blocks.0.attn1", "self", "up", 8, 0)
TOL = 1e-5
SCALE = 16**-0.5


CASES = {
    "cfg-1img": (BatchLayout.for_pipeline(1, 1, cfg=True), (8, 8), [(2, 2, 6, 5)]),
    "no-cfg-2prompts-2masks": (BatchLayout.for_pipeline(2, 1, cfg=False), (8, 8), [(2, 2, 6, 5), (0, 4, 3, 8)]),
    "cfg-2per-prompt-nonsquare": (BatchLayout.for_pipeline(1, 2, cfg=True), (8, 12), [(1, 3, 7, 9), (4, 0, 8, 12)]),
    "one-image-fully-masked": (BatchLayout.for_pipeline(2, 1, cfg=True), (6, 10), [(0, 0, 6, 10), (1, 1, 4, 4)]),
    "no-masked-token": (BatchLayout.for_pipeline(1, 1, cfg=False), (6, 10), [(0, 0, 0, 0)]),
}


@pytest.mark.parametrize("lam", [0.8, 1.4])
@pytest.mark.parametrize("case", list(CASES))
def test_masked_mean_matches_naive_reference_on_random_tensors(case, lam):
    layout, hw, boxes = CASES[case]
    mask, q, k, v = random_case(layout, hw, boxes)
    _, call = make_call(SITE, mask, hw, layout, q, k, v, SCALE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compute(call, ActiveOps(key_value=(KvBankOp("makvs", site=SITE, scale=lam),)))
    rows = site_masks(mask, hw, hw, list(layout.images))
    ref = naive_makvs(q, k, v, rows, lam, SCALE)
    err = (out.double() - ref).abs().max().item()
    n = hw[0] * hw[1]
    n_unmasked = int((rows == 0).sum(-1).max())
    print(f"kv_bank random {case} lambda={lam}: max abs err {err:.2e}; keys {call.key.shape[-2]} "
          f"(naive {2 * n}, HW + max n_unmasked + 1 = {n + n_unmasked + 1})")
    assert err <= TOL
    assert call.key.shape[-2] == n + n_unmasked + 1
    assert len(caught) == (1 if case == "one-image-fully-masked" else 0)
    plain = softmax_attention(q, k, SCALE) @ v.double()
    injected = (rows == 0).any(-1)  # rows that have an unmasked mean
    assert ((out.double() - plain).abs().amax(dim=(1, 2, 3)) > 1e-2).tolist() == injected.tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_static_shape_path_for_torch_compile_matches_reference(case, monkeypatch):
    """Under torch.compile kv_bank appends all HW keys (masked ones at -inf): same attention."""
    layout, hw, boxes = CASES[case]
    mask, q, k, v = random_case(layout, hw, boxes)
    _, call = make_call(SITE, mask, hw, layout, q, k, v, SCALE)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = compute(call, ActiveOps(key_value=(KvBankOp("makvs", site=SITE, scale=1.4),)))
    ref = naive_makvs(q, k, v, site_masks(mask, hw, hw, list(layout.images)), 1.4, SCALE)
    assert call.key.shape[-2] == 2 * hw[0] * hw[1] + 1
    assert (out.double() - ref).abs().max().item() <= TOL


def test_compiled_style_phase_has_no_graph_breaks():
    """torch.compile traces a MAKVS call as one graph (no data-dependent host reads)."""
    layout, hw, boxes = CASES["cfg-2per-prompt-nonsquare"]
    mask, q, k, v = random_case(layout, hw, boxes)
    state, _ = make_call(SITE, mask, hw, layout, q, k, v, SCALE)
    ops = ActiveOps(key_value=(KvBankOp("makvs", site=SITE, scale=1.4),))

    def attention(q, k, v):
        from attnctl.call import AttentionCall

        return compute(AttentionCall(SITE, state, q, k, v, None, SCALE), ops)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(attention)(q, k, v)
    assert explanation.graph_break_count == 0
    ref = naive_makvs(q, k, v, site_masks(mask, hw, hw, list(layout.images)), 1.4, SCALE)
    assert (torch.compile(attention, backend="eager")(q, k, v).double() - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("cfg", [True, False])
def test_row_source_matches_naive_reference(cfg):
    """Each row also attends to image 1's keys/values in its own CFG branch; image 1 itself is unchanged."""
    layout = BatchLayout.for_pipeline(1, 3, cfg=cfg)
    mask, q, k, v = random_case(layout, (6, 8), [(1, 1, 4, 4)])
    _, call = make_call(SITE, mask, (6, 8), layout, q, k, v, SCALE)
    out = compute(call, ActiveOps(key_value=(KvBankOp("style", site=SITE, scale=1.2, source="row", source_image=1),)))
    refs = [next(j for j in range(len(layout)) if layout.images[j] == 1 and layout.branches[j] == layout.branches[r])
            for r in range(len(layout))]
    ref = naive_row_bank(q, k, v, refs, 1.2, SCALE)
    err = (out.double() - ref).abs().max().item()
    print(f"kv_bank row source cfg={cfg}: max abs err {err:.2e}")
    assert err <= TOL
    plain = softmax_attention(q, k, SCALE) @ v.double()
    changed = (out.double() - plain).abs().amax(dim=(1, 2, 3)) > 1e-2
    assert changed.tolist() == [layout.images[r] != 1 for r in range(len(layout))]


def test_masked_outputs_move_toward_the_unmasked_mean_as_lambda_grows():
    """Object keys/values (masked) lie along w / o, background ones along u / b; masked queries
    prefer the object. Raising lambda shifts their mass to the bank, whose values average to
    V_bar (unmasked V(i) and V_bar copies), so the masked outputs approach V_bar."""
    g = torch.Generator().manual_seed(0)
    hw, d = (8, 8), 16
    n = hw[0] * hw[1]
    mask = torch.zeros(1, 1, *hw)
    mask[0, 0, 2:6, 2:6] = 1
    m = mask.flatten(1)[0].bool()[:, None]
    u, w, o, b = torch.linalg.qr(torch.randn(d, 4, generator=g))[0].T
    k = torch.where(m, 1.5 * w, 1.5 * u) + 0.1 * torch.randn(n, d, generator=g)
    q = (2.5 * w + 1.5 * u) + 0.1 * torch.randn(n, d, generator=g)
    v = torch.where(m, 2 * o, 2 * b) + 0.3 * torch.randn(n, d, generator=g)
    q, k, v = (t[None, None] for t in (q, k, v))
    m = m[:, 0]
    v_bar = v[0, 0][~m].mean(0)
    layout = BatchLayout.for_pipeline(1, 1, cfg=False)
    distances, bank_mass = [], []
    for lam in [0.5, 1.0, 1.4, 2.0, 4.0]:
        _, call = make_call(SITE, mask, hw, layout, q, k, v, SCALE)
        out = compute(call, ActiveOps(key_value=(KvBankOp("makvs", site=SITE, scale=lam),)))
        assert (out.double() - naive_makvs(q, k, v, mask.flatten(1), lam, SCALE)).abs().max() <= TOL
        distances.append((out[0, 0][m] - v_bar).norm(dim=-1).mean().item())
        # mass of masked queries on the bank half of the explicit 2*HW-key map
        keys = torch.cat([k.double(), lam * makvs_bank(k, mask.flatten(1))], dim=2)
        bank_mass.append(softmax_attention(q, keys, SCALE)[0, 0][m][:, n:].sum(-1).mean().item())
    print("kv_bank mechanism: lambda [0.5, 1, 1.4, 2, 4] -> mean |out - V_bar| over masked queries "
          + ", ".join(f"{x:.4f}" for x in distances) + "; bank mass " + ", ".join(f"{x:.3f}" for x in bank_mass))
    assert all(a > b for a, b in zip(distances, distances[1:]))
    assert all(a < b for a, b in zip(bank_mass, bank_mass[1:]))
    assert distances[-1] < 0.5 * distances[0]


def test_full_mask_skips_injection_and_warns_once_per_run():
    layout, hw = BatchLayout.for_pipeline(1, 1, cfg=True), (6, 8)
    mask, q, k, v = random_case(layout, hw, [(0, 0, 6, 8)])
    op = KvBankOp("makvs", site=SITE)
    plain = softmax_attention(q, k, SCALE) @ v.double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, call = make_call(SITE, mask, hw, layout, q, k, v, SCALE)
        outs = [compute(call, ActiveOps(key_value=(op,)))]
        for _ in range(3):  # more calls in the same run: no new warning
            call = attnctl.AttentionCall(SITE, state, q, k, v, None, SCALE)
            outs.append(compute(call, ActiveOps(key_value=(op,))))
        assert len(caught) == 1 and "covers every token" in str(caught[0].message)
        assert call.key.shape[-2] == 48  # nothing appended
        compute(make_call(SITE, mask, hw, layout, q, k, v, SCALE)[1], ActiveOps(key_value=(op,)))
        assert len(caught) == 2  # a new run warns again
    assert all((o.double() - plain).abs().max() <= TOL for o in outs)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_half_precision_stays_close_to_the_reference(dtype, tol):
    layout, hw, boxes = CASES["cfg-2per-prompt-nonsquare"]
    mask, q, k, v = random_case(layout, hw, boxes)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    _, call = make_call(SITE, mask, hw, layout, q, k, v, SCALE)
    out = compute(call, ActiveOps(key_value=(KvBankOp("makvs", site=SITE, scale=1.4),)))
    ref = naive_makvs(q, k, v, site_masks(mask, hw, hw, list(layout.images)), 1.4, SCALE)
    err = (out.double() - ref).abs().max().item()
    print(f"kv_bank {dtype}: max abs err {err:.2e}")
    assert out.dtype == dtype and err <= tol


TINY_CASES = {
    # name: (prompts, images per prompt, cfg, (height, width), boxes, params)
    "cfg-default-sites": (["a cat"], 1, True, (64, 64), [(16, 20, 48, 44)], {}),
    "no-cfg-2masks-nonsquare": (["a cat", "a dog"], 1, False, (64, 96), [(16, 20, 48, 44), (0, 48, 40, 96)],
                                {"sites": "self[0:16]", "scale": 0.8}),
    "cfg-row-source": (["a dog"], 2, True, (64, 64), [(8, 8, 40, 56)], {"source": "row", "source_image": 0}),
}


@pytest.mark.parametrize("case", list(TINY_CASES))
def test_tiny_unet_matches_naive_processor(tiny_pipe, case):
    """One pipeline step: the UNet's noise prediction with the fast path vs the naive processor."""
    prompts, n_per, cfg, size, boxes, params = TINY_CASES[case]
    image, masks, mask = tiny_inputs(*size, boxes)
    layout = BatchLayout.for_pipeline(len(prompts), n_per, cfg)
    _, (plain,) = pipe_latents(tiny_pipe, image, masks, prompts, n_per, cfg, size)
    config = {"strategies": {"makvs": {"strategy": "kv_bank", **params}}}
    with attnctl.attach(tiny_pipe, config, StrategyManager()) as ctl:
        with ctl.run(layout, mask=mask):
            fast_latents, (fast,) = pipe_latents(tiny_pipe, image, masks, prompts, n_per, cfg, size)
    latent_hw = (size[0] // 8, size[1] // 8)
    lam = params.get("scale", 1.4)
    refs = [next(j for j in range(len(layout)) if layout.images[j] == 0 and layout.branches[j] == layout.branches[r])
            for r in range(len(layout))]

    def reference(site):
        if params.get("source") == "row":
            return lambda q, k, v, scale: naive_row_bank(q, k, v, refs, lam, scale)
        rows = site_masks(mask, latent_hw, grid_at(site.level, latent_hw), list(layout.images))
        return lambda q, k, v, scale: naive_makvs(q, k, v, rows, lam, scale)

    set_naive(tiny_pipe, params.get("sites", "self[-8:]"), reference)
    naive_latents, (naive,) = pipe_latents(tiny_pipe, image, masks, prompts, n_per, cfg, size)
    err = (fast - naive).abs().max().item()
    print(f"kv_bank tiny UNet {case}: max abs err {err:.2e} on the noise prediction "
          f"(|pred| max {naive.abs().max():.2f}), {(fast_latents - naive_latents).abs().max():.2e} on the "
          f"latents after the step; effect vs plain {(fast - plain).abs().max():.2e}")
    assert fast.shape[0] == len(layout)
    assert err <= TOL
    assert (fast - plain).abs().max() > 1e-3


def test_tiny_pipeline_with_full_mask_is_unchanged_and_warns_once(tiny_pipe):
    image, masks, mask = tiny_inputs(64, 64, [(0, 0, 64, 64)])
    _, plain = pipe_latents(tiny_pipe, image, masks, ["a cat"], 1, True, (64, 64), steps=2)
    with attnctl.attach(tiny_pipe, {"strategies": {"makvs": {"strategy": "kv_bank"}}}, StrategyManager()) as ctl:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with ctl.run(BatchLayout.for_pipeline(1, 1, cfg=True), mask=mask):
                _, fast = pipe_latents(tiny_pipe, image, masks, ["a cat"], 1, True, (64, 64), steps=2)
    ours = [w for w in caught if "strategies.makvs" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert len(fast) == 2 and all(torch.equal(a, b) for a, b in zip(fast, plain))


def test_parameters_defaults_and_errors():
    assert [(n, d) for n, _, d, _ in kv_bank.SPEC.parameter_table()] == [
        ("sites", "self[-8:]"), ("scale", 1.4), ("source", "masked_mean"), ("source_image", 0), ("rope", "rotated")
    ]
    pipe = build_tiny_inpaint_pipeline(0)
    sites = describe_sites(pipe.unet)
    manager = StrategyManager(plugins=[kv_bank], autoload=False)
    plan = attnctl.compile_plan({"strategies": {"kv_bank": {}}}, sites, manager)
    assert sorted(sites.by_name(n).index for n in plan.site_ops) == list(range(8, 16))
    for bad, message in [({"scale": 0.0}, "scale"), ({"source": "masked_maen"}, "did you mean 'masked_mean'"),
                         ({"sites": "cross[-8:]"}, "cross-attention"), ({"source_image": -1}, "source_image"),
                         ({"rope": "rotate"}, "rope: unknown 'rotate'")]:
        with pytest.raises(ConfigError, match=message):
            attnctl.compile_plan({"strategies": {"kv_bank": bad}}, sites, manager)
    config = {"strategies": {"style": {"strategy": "kv_bank", "source": "row", "source_image": 2}}}
    with attnctl.attach(pipe, config, manager) as ctl:
        with pytest.raises(InputError, match="source_image=2"):
            with ctl.run(BatchLayout.for_pipeline(1, 2, cfg=True)):
                pass


def test_registered_through_entry_points():
    strategies = StrategyManager().strategies()
    assert "kv_bank" in strategies and "region_mask" in strategies
    assert strategies["kv_bank"].params is kv_bank.KvBankParams
