"""No HW x HW self-attention map is created by region_mask, kv_bank or a measurement (MeasureOp).

What is checked, and at which level: a guard enters a ``TorchFunctionMode`` (every torch
function/method call, e.g. ``F.scaled_dot_product_attention`` as one call) and a
``TorchDispatchMode`` (every ATen operator below it, i.e. what SDPA decomposes into when
it falls back to its math backend) and fails on any output tensor whose last two
dimensions are both >= HW (a map, with or without appended keys). It cannot see inside a
single fused kernel (``_scaled_dot_product_flash_attention_for_cpu`` here); those kernels
work on key blocks and keep only [Nq, d] outputs and [Nq] statistics. The guard is shown
to catch the naive references and SDPA's math backend, so a silent fallback to the math
path (e.g. values wider than queries, which the core pads away) fails these tests.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import attnctl
from attnctl.attention import compute
from attnctl import ActiveOps, BatchLayout, Site, StrategyManager
from example_plugin import load_region_boost
from reference_attention import make_call, naive_makvs, naive_sams, single_thread, tiny_inputs
from strategies.kv_bank import KvBankOp
from strategies.probe_curves import SelfCurvesOp
from strategies.region_mask import RegionMaskOp

_one_thread = pytest.fixture(autouse=True)(single_thread)


class QuadraticMapError(AssertionError):
    """An op produced a tensor shaped like an attention map over the image tokens."""


def _check(outputs, hw: int, where: str) -> None:
    for t in tree_leaves(outputs):
        if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[-1] >= hw and t.shape[-2] >= hw:
            raise QuadraticMapError(f"{where} produced a {tuple(t.shape)} tensor (HW = {hw})")


class _FunctionGuard(TorchFunctionMode):
    def __init__(self, hw: int):
        super().__init__()
        self.hw = hw

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        _check(out, self.hw, f"torch function {getattr(func, '__name__', func)}")
        return out


class _DispatchGuard(TorchDispatchMode):
    def __init__(self, hw: int):
        super().__init__()
        self.hw = hw
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func))
        _check(out, self.hw, f"aten op {func}")
        return out


class NoQuadraticMaps:
    """Context manager: both guards for token count ``hw``; ``.ops`` lists the ATen ops seen."""

    def __init__(self, hw: int):
        self.function, self.dispatch = _FunctionGuard(hw), _DispatchGuard(hw)

    @property
    def ops(self) -> list[str]:
        return self.dispatch.ops

    def __enter__(self):
        self.function.__enter__()
        self.dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self.dispatch.__exit__(*exc)
        self.function.__exit__(*exc)


SITE = Site("down_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", "down", 2, 0)
HW = (12, 16)  # 192 tokens, far above the head width
N = HW[0] * HW[1]


def _inputs(layout, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(2, 1, *HW)
    mask[0, :, 2:9, 3:10] = 1
    mask[1, :, 6:12, 0:5] = 1
    q, k, v = (torch.randn(len(layout), 2, N, 16, generator=g).to(dtype) for _ in range(3))
    return mask, q, k, v


def test_guard_catches_explicit_maps_and_the_math_backend():
    layout = BatchLayout.for_pipeline(2, 1, cfg=True)
    mask, q, k, v = _inputs(layout)
    rows = torch.zeros(len(layout), N)
    with pytest.raises(QuadraticMapError):
        with NoQuadraticMaps(N):
            naive_sams(q, k, v, rows, 0.1, 0.25)
    with pytest.raises(QuadraticMapError):
        with NoQuadraticMaps(N):
            naive_makvs(q, k, v, rows, 1.4, 0.25)
    with pytest.raises(QuadraticMapError, match="aten op"):  # inside one SDPA call: dispatch level
        with sdpa_kernel([SDPBackend.MATH]), NoQuadraticMaps(N):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)


OPS = {
    "region_mask": lambda: ActiveOps(reweight=(RegionMaskOp("sams", site=SITE, tau=0.1),)),
    "region_mask-renormalize": lambda: ActiveOps(reweight=(RegionMaskOp("sams", site=SITE, renormalize=True),)),
    "kv_bank-masked_mean": lambda: ActiveOps(key_value=(KvBankOp("makvs", site=SITE),)),
    "kv_bank-row": lambda: ActiveOps(key_value=(KvBankOp("style", site=SITE, source="row", source_image=1),)),
    "both": lambda: ActiveOps(key_value=(KvBankOp("makvs", site=SITE),),
                              reweight=(RegionMaskOp("sams", site=SITE, tau=0.1),)),
    # the example plugin's renormalized rank-1 reweighting next to both built-ins, at one site
    "all-with-region_boost": lambda: ActiveOps(
        key_value=(KvBankOp("makvs", site=SITE),),
        reweight=(load_region_boost().RegionBoostOp("boost", site=SITE, gain=2.0, renormalize=True),
                  RegionMaskOp("sams", site=SITE, tau=0.1)),
    ),
    # the curves probe's measurement (columns over all keys ride along in the same fused call)
    "measure": lambda: ActiveOps(measure=(SelfCurvesOp("curves", site=SITE),)),
    "measure-with-both": lambda: ActiveOps(key_value=(KvBankOp("makvs", site=SITE),),
                                           reweight=(RegionMaskOp("sams", site=SITE, tau=0.1, renormalize=True),),
                                           measure=(SelfCurvesOp("curves", site=SITE),)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPS))
def test_fast_paths_create_no_hw_by_hw_tensor(name, dtype):
    layout = BatchLayout.for_pipeline(2, 1, cfg=True)
    mask, q, k, v = _inputs(layout, dtype)
    _, call = make_call(SITE, mask, HW, layout, q, k, v, 0.25)
    ops = OPS[name]()
    with NoQuadraticMaps(N) as guard:
        out = compute(call, ops)
    assert out.shape == (len(layout), 2, N, 16) and out.dtype == dtype
    assert any("scaled_dot_product" in op for op in guard.ops)  # the fused kernel, not the math decomposition
    assert not any("softmax" in op for op in guard.ops)


def test_tiny_unet_forward_creates_no_map_at_large_sites(tiny_pipe, monkeypatch):
    """Every attention computation of a tiny UNet forward (64x96 -> 8x12 latent) runs under the guard
    for its own site's HW, where HW (96) exceeds every channel width; both strategies and the curves
    probe on all sites."""
    config = {"strategies": {"sams": {"strategy": "region_mask", "sites": "self[0:16]"},
                             "makvs": {"strategy": "kv_bank", "sites": "self[0:16]"}},
              "probes": {"curves": {"enabled": True}}}
    checked: list[str] = []
    def guarded(call, ops):
        h, w = call.state.grid(call.site)
        if h * w < 64:  # small grids: token counts overlap channel widths, the shape test is meaningless
            return compute(call, ops)
        checked.append(call.site.key)
        with NoQuadraticMaps(h * w):
            return compute(call, ops)

    monkeypatch.setattr("attnctl.adapters.compute", guarded)
    _, _, mask = tiny_inputs(64, 96, [(16, 20, 48, 44)])
    g = torch.Generator().manual_seed(0)
    sample, text = torch.randn(2, 9, 8, 12, generator=g), torch.randn(2, 77, 32, generator=g)
    with attnctl.attach(tiny_pipe, config, StrategyManager()) as ctl:
        with ctl.run(BatchLayout.for_pipeline(1, 1, cfg=True), mask=mask, token_indices=[[1, 2]]) as state:
            with torch.no_grad():
                out = tiny_pipe.unet(sample, 500, encoder_hidden_states=text).sample
    assert out.shape == (2, 4, 8, 12) and torch.isfinite(out).all()
    assert "self[0]" in state.results["curves"].series["bank_share"]  # the probe measured at the guarded sites
    assert sorted(set(checked)) == ["self[0]", "self[13]", "self[14]", "self[15]", "self[1]"]
