"""The MeasureOp contract: sums are W_eff @ columns with the weights the output is made of,
computed inside the fused call, without changing the output."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from attnctl import ActiveOps, BatchLayout, MeasureOp, ObserveOp, Site
from attnctl.attention import compute
from attnctl.errors import ConfigError
from example_plugin import load_region_boost
from reference_attention import make_call, random_case
from strategies.kv_bank import KvBankOp
from strategies.region_mask import RegionMaskOp

SITE = Site("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", "up", 7, 0)
HW = (6, 8)


@dataclass(eq=False)
class OwnAndBank(MeasureOp):
    """Columns: own keys, appended keys, and a per-row key weight (so rows differ)."""

    seen: list = field(default_factory=list)

    def columns(self, call):
        n, own = call.key.shape[-2], call.num_own_keys
        c = torch.zeros(len(call.rows), 1, n, 3)
        c[:, 0, :own, 0] = 1.0
        c[:, 0, own:, 1] = 1.0
        c[:, 0, :own, 2] = call.mask()
        return c

    def measure(self, call, sums, output):
        self.seen.append((sums, output))


@dataclass(eq=False)
class Probs(ObserveOp):
    passes: frozenset = field(default=frozenset({"main"}), kw_only=True)
    seen: list = field(default_factory=list)

    def observe(self, call, probs):
        self.seen.append(probs)


def _ops():
    boost = load_region_boost()
    return {
        "plain": {},
        "bank": {"key_value": (KvBankOp("kv", site=SITE),)},
        "sams": {"reweight": (RegionMaskOp("sams", site=SITE, tau=0.2),)},
        "sams-renormalized": {"reweight": (RegionMaskOp("sams", site=SITE, tau=0.2, renormalize=True),)},
        "all": {"key_value": (KvBankOp("kv", site=SITE),),
                "reweight": (RegionMaskOp("sams", site=SITE, tau=0.2),
                             boost.RegionBoostOp("b", site=SITE, gain=3.0, renormalize=True))},
    }


def _call():
    layout = BatchLayout.for_pipeline(1, 2, cfg=True)
    mask, q, k, v = random_case(layout, HW, [(1, 2, 4, 6), (0, 0, 3, 8)])
    return make_call(SITE, mask, HW, layout, q, k, v, 16**-0.5)[1]


@pytest.mark.parametrize("name", list(_ops()))
def test_sums_are_the_effective_weights_times_the_columns(name):
    plain = compute(_call(), ActiveOps(**_ops()[name]))
    measure = OwnAndBank("m", site=SITE)
    out = compute(call := _call(), ActiveOps(**_ops()[name], measure=(measure,)))
    observe, explicit = Probs("o", site=SITE), OwnAndBank("m", site=SITE)
    compute(call2 := _call(), ActiveOps(**_ops()[name], observe=(observe,), measure=(explicit,)))
    (probs,), ((sums, output),), ((explicit_sums, _),) = observe.seen, measure.seen, explicit.seen
    expected = probs @ explicit.columns(call2).expand(*probs.shape[:2], -1, -1)  # W_eff @ C, literally
    assert sums.dtype == torch.float32 and sums.shape == (4, 2, 48, 3)
    assert (sums - expected).abs().max() <= 1e-6  # fused: columns rode along as value channels
    assert (explicit_sums - expected).abs().max() <= 1e-6  # explicit path (an observer at the site)
    assert torch.equal(output, out)  # measure sees exactly the output the site returns
    assert (out - plain).abs().max() <= 1e-6  # and measuring does not change it
    assert call.key.shape[-2] == call2.key.shape[-2]


def test_several_measure_ops_get_their_own_columns():
    first, second = OwnAndBank("a", site=SITE), OwnAndBank("b", site=SITE)
    compute(_call(), ActiveOps(**_ops()["all"], measure=(first,)))
    compute(_call(), ActiveOps(**_ops()["all"], measure=(first, second)))
    alone, together, other = first.seen[0][0], first.seen[1][0], second.seen[0][0]
    assert (alone - together).abs().max() <= 1e-6 and (alone - other).abs().max() <= 1e-6


@dataclass(eq=False)
class WrongKeys(MeasureOp):
    def columns(self, call):
        return torch.ones(1, 1, call.num_own_keys + 5, 1)

    def measure(self, call, sums, output):  # pragma: no cover - never reached
        raise AssertionError


def test_columns_of_the_wrong_key_count_are_refused_with_the_rule():
    with pytest.raises(ConfigError, match=r"strategies\.bad at self\[7\].*all keys: 48 own \+ \d+ appended"):
        compute(_call(), ActiveOps(**_ops()["bank"], measure=(WrongKeys("bad", site=SITE),)))


def test_low_precision_values_give_fp32_sums():
    layout = BatchLayout.for_pipeline(1, 2, cfg=True)
    mask, q, k, v = random_case(layout, HW, [(1, 2, 4, 6), (0, 0, 3, 8)])
    measure = OwnAndBank("m", site=SITE)
    call = make_call(SITE, mask, HW, layout, q.bfloat16(), k.bfloat16(), v.bfloat16(), 16**-0.5)[1]
    out = compute(call, ActiveOps(**_ops()["all"], measure=(measure,)))
    sums = measure.seen[0][0]
    assert out.dtype == torch.bfloat16 and sums.dtype == torch.float32
    assert (sums[..., :2].sum(-1) - 1).abs().max() <= 2e-2  # rows of the renormalized map sum to 1
