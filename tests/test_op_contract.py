"""The op contract of docs/writing-strategies.md, clause by clause."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from attnctl import ActiveOps, BatchLayout, ObserveOp, ReweightOp, Site
from attnctl.errors import ConfigError
from example_plugin import load_region_boost
from reference_attention import make_call, random_case, softmax_attention
from strategies.kv_bank import KvBankOp

SITE = Site("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", "up", 7, 0)
HW = (6, 8)
N = HW[0] * HW[1]


def _call(dtype=torch.float32, layout=None):
    layout = layout or BatchLayout.for_pipeline(1, 2, cfg=True)
    mask, q, k, v = random_case(layout, HW, [(1, 2, 4, 6), (0, 0, 3, 8)])
    return make_call(SITE, mask, HW, layout, q.to(dtype), k.to(dtype), v.to(dtype), 16**-0.5)


@dataclass(eq=False)
class WrongWidth(ReweightOp):
    def factors(self, call):
        return [(call.query.new_ones(1, 1, 1, 1), call.query.new_ones(1, 1, call.key.shape[-2], 1))]


@dataclass(eq=False)
class Record(ObserveOp):
    seen: list = field(default_factory=list)

    def observe(self, call, probs):
        self.seen.append(probs)


def test_factors_over_all_keys_are_refused_with_the_rule():
    """b_r covers own keys only; listing appended keys is an error that says so."""
    _, call = _call()
    ops = ActiveOps(key_value=(KvBankOp("kv", site=SITE),), reweight=(WrongWidth("bad", site=SITE),))
    with pytest.raises(ConfigError, match=r"strategies\.bad at self\[7\].*own keys.*weight 1"):
        call.compute(ops)


def test_memo_is_keyed_by_rows_and_level():
    state, call = _call()
    a = call.memo("k", lambda: "main rows")
    assert call.memo("k", lambda: "recomputed") == "main rows"  # cached for the same rows
    with state.guidance_pass(state.layout.cond_rows):
        _, q, k, v = random_case(state.layout.subset(state.layout.cond_rows), HW, [(0, 0, 1, 1)])
        from attnctl.attention import AttentionCall

        cond = AttentionCall(SITE, state, q, k, v, None, 0.25)
        assert cond.rows == state.layout.cond_rows
        assert cond.memo("k", lambda: "cond rows") == "cond rows"  # other rows: another entry
    assert a == "main rows"


def test_low_precision_inputs_with_fp32_factors_give_the_value_dtype():
    plugin = load_region_boost()
    for dtype in (torch.float16, torch.bfloat16):
        _, call = _call(dtype)
        out = call.compute(ActiveOps(reweight=(plugin.RegionBoostOp("b", site=SITE, gain=2.0, renormalize=True),)))
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_observers_see_the_effective_weights_over_all_keys():
    plugin = load_region_boost()
    _, call = _call()
    record = Record("obs", site=SITE)
    boost = plugin.RegionBoostOp("b", site=SITE, gain=3.0, renormalize=True)
    out = call.compute(ActiveOps(key_value=(KvBankOp("kv", site=SITE),), reweight=(boost,), observe=(record,)))
    (probs,) = record.seen
    assert probs.dtype == torch.float32 and probs.shape[-1] == call.key.shape[-2] > N  # own + appended keys
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)  # renormalized
    assert torch.allclose(out, (probs @ call.value.float()).to(out.dtype), atol=1e-6)  # what the output is made of


def test_boolean_module_masks_become_additive_biases():
    layout = BatchLayout.for_pipeline(1, 1, cfg=False)
    _, q, k, v = random_case(layout, HW, [(0, 0, 1, 1)])
    keep = torch.ones(1, 1, N, N, dtype=torch.bool)
    keep[..., : N // 2] = False  # the first half of the keys is masked out
    state, call = make_call(SITE, torch.zeros(1, 1, *HW), HW, layout, q, k, v, 0.25)
    from attnctl.attention import AttentionCall

    call = AttentionCall(SITE, state, q, k, v, keep, 0.25)
    out = call.compute(ActiveOps())
    ref = softmax_attention(q[..., :, :], k[..., N // 2 :, :], 0.25) @ v[..., N // 2 :, :].double()
    assert call.bias.dtype == q.dtype and (out.double() - ref).abs().max() < 1e-6
