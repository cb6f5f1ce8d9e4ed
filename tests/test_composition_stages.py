"""The composition matrix, extended to the stages the method plugins use.

Every new op kind (projection, map, branch) next to every earlier kind (key/value bank,
reweight, measure) at one site equals the naive composition written from the documented
stage order, in float64 with an explicit softmax:

    q, K, V   <- projection (here: keys and values of the row's ``src`` partner)
    keys      <- [K ; lambda K~]   values <- [V ; V~]             (kv_bank, masked mean)
    logits    <- q keys^T s  (+ the map op's logit edit)
    A         <- softmax(logits) ⊙ W  (W: region_mask on own keys, 1 on appended ones)
    A         <- the map op's probability edit
    out       <- A values;  measured sums <- A columns
    out[1]    <- 0.5 out[1] + 0.5 softmax(q_1 K_1^T s) V_1        (branch, own keys only)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import torch

from attnctl import ActiveOps, BatchLayout, Branch, BranchOp, MeasureOp, Site, compile_plan, describe_sites
from attnctl.attention import compute
from attnctl.plugins import StrategyManager
from reference_attention import make_call, makvs_bank, random_case, sams_weights, softmax_attention
from strategies.kv_bank import KvBankOp
from strategies.region_mask import RegionMaskOp
from attnctl import MapOp
from test_stage_ops import LAYOUT, SOURCE, ContrastClip, ScaleQuery, SwapKV, on_row

SITE = Site("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", "up", 7, 0)
HW = (4, 6)
SCALE = 16**-0.5
LAMBDA = 1.4


@dataclass(eq=False)
class OwnContrast(MapOp):
    """Logit ramp and contrast + clip on the site's own keys (appended keys may come in a bank's compact form)."""

    def edit_logits(self, call, queries, logits):
        n = call.num_own_keys
        return torch.cat([logits[..., :n] + torch.linspace(0, 1, n), logits[..., n:]], dim=-1)

    def edit_probs(self, call, queries, probs):
        n = call.num_own_keys
        own = ((probs[..., :n] - 1 / n) * 1.67 + 1 / n).clamp(0, 1)
        return torch.cat([own, probs[..., n:]], dim=-1)


@dataclass(eq=False)
class HalfPlain(BranchOp):
    """Row 1 becomes half its output and half plain attention over its own keys."""

    def main_weight(self, call):
        return on_row(call, 0.5, 1.0)

    def branches(self, call):
        return [Branch(on_row(call, 0.5, 0.0), key=call.own_key, value=call.own_value)]


@dataclass(eq=False)
class KeyIndex(MeasureOp):
    """The mass on the site's own keys, and on own keys weighted by their index."""

    sums: list = field(default_factory=list)

    def columns(self, call):
        n, extra = call.num_own_keys, call.key.shape[-2] - call.num_own_keys
        own = torch.stack([torch.ones(n), torch.arange(n, dtype=torch.float32)], dim=-1)
        return torch.cat([own, own.new_zeros(extra, 2)])[None, None]

    def measure(self, call, sums, output):
        self.sums.append(sums)


NEW = {"projection": lambda: SwapKV("p", site=SITE), "map": lambda: OwnContrast("m", site=SITE, query_chunk=5),
       "branch": lambda: HalfPlain("b", site=SITE)}
OLD = {"kv_bank": lambda: KvBankOp("k", site=SITE, scale=LAMBDA), "reweight": lambda: RegionMaskOp("r", site=SITE, tau=0.1),
       "measure": lambda: KeyIndex("z", site=SITE)}


def naive(q, k, v, site_mask, kinds: set[str]):
    q, k, v = q.double(), k.double(), v.double()
    if "projection" in kinds:
        k, v = k[SOURCE], v[SOURCE]
    n = k.shape[-2]
    keys, values = k, v
    if "kv_bank" in kinds:
        keys = torch.cat([k, LAMBDA * makvs_bank(k, site_mask)], dim=2)
        values = torch.cat([v, makvs_bank(v, site_mask)], dim=2)
    nk = keys.shape[-2]
    logits = q @ keys.transpose(-1, -2) * SCALE
    if "map" in kinds:
        logits[..., :n] += torch.linspace(0, 1, n).double()
    a = logits.softmax(-1)
    if "reweight" in kinds:
        w = torch.ones(a.shape[0], 1, n, nk, dtype=torch.float64)
        w[..., :n] = sams_weights(site_mask, 0.1)
        a = w * a
    if "map" in kinds:
        a[..., :n] = ((a[..., :n] - 1 / n) * 1.67 + 1 / n).clamp(0, 1)
    out = a @ values
    columns = torch.zeros(nk, 2, dtype=torch.float64)
    columns[:n, 0], columns[:n, 1] = 1, torch.arange(n, dtype=torch.float64)
    sums = a @ columns
    if "branch" in kinds:
        out[1] = 0.5 * out[1] + 0.5 * (softmax_attention(q[1:2], k[1:2], SCALE) @ v[1:2])[0]
    return out, sums


PAIRS = [(a, b) for a in NEW for b in OLD] + [tuple(NEW)] + [tuple(NEW) + tuple(OLD)]


@pytest.mark.parametrize("kinds", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_new_stage_next_to_old_stage_equals_the_naive_composition(kinds):
    mask, q, k, v = random_case(LAYOUT, HW, [(1, 1, 3, 4)], seed=3)
    state, call = make_call(SITE, mask, HW, LAYOUT, q, k, v, SCALE)
    ops = {kind: (NEW | OLD)[kind]() for kind in kinds}
    out = compute(call, ActiveOps.of(sorted(ops.values(), key=lambda op: (type(op).stage, op.strategy))))
    expected, sums = naive(q, k, v, state.mask(SITE.level).double(), set(kinds))
    assert (out.double() - expected).abs().max() < 1e-5
    if "measure" in kinds:
        got = torch.cat(ops["measure"].sums, dim=-2) if len(ops["measure"].sums) > 1 else ops["measure"].sums[0]
        assert (got.double() - sums).abs().max() < 1e-4


def test_plan_order_does_not_depend_on_registration_order():
    """Two instances of each new kind at one site: the compiled order is (stage, instance name) either way."""
    from toy_strategies import FactoryPlugin

    sites = describe_sites(_tiny_unet())
    site = sites.of_kind("self")[0]
    makers = {"toy_a": lambda inst, s: [ScaleQuery(inst, site=site, factor=2.0), HalfPlain(inst, site=site)],
              "toy_b": lambda inst, s: [SwapKV(inst, site=site), ContrastClip(inst, site=site)]}
    orders = []
    for names in itertools.permutations(makers):
        manager = StrategyManager(plugins=[FactoryPlugin(makers[n], name=n) for n in names], autoload=False)
        config = {"strategies": {"zeta": {"strategy": "toy_a"}, "alpha": {"strategy": "toy_b"}}}
        plan = compile_plan(config, sites, manager)
        orders.append([(type(op).__name__, op.strategy) for op in plan.site_ops[site.name]])
    assert orders[0] == orders[1] == [("SwapKV", "alpha"), ("ScaleQuery", "zeta"), ("ContrastClip", "alpha"),
                                      ("HalfPlain", "zeta")]


def _tiny_unet():
    from attnctl.testing.tiny import TINY_UNET_CONFIG
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**TINY_UNET_CONFIG)
