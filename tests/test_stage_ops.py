"""Projection, map and branch ops at one site: each against its literal equation (float64, explicit softmax).

The layout has two roles: the main image (uncond, cond) and an added ``src`` row per branch,
so cross-row reads (``call.take``) are exercised the way methods use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from attnctl import ActiveOps, BatchLayout, Branch, BranchOp, MapOp, ObserveOp, ProjectionOp, Site
from attnctl.attention import compute
from attnctl.errors import RunError
from reference_attention import make_call, random_case, softmax_attention
from strategies.region_mask import RegionMaskOp, soft_mask

SITE = Site("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", "up", 7, 0)
HW = (4, 6)
N = HW[0] * HW[1]
SCALE = 16**-0.5
LAYOUT = BatchLayout.for_pipeline(1, 1, cfg=True).with_rows([("src", True, None)])  # [u, c, u_src, c_src]
SOURCE = [2, 3, 2, 3]  # each row's src partner


def _case(seed=0):
    mask, q, k, v = random_case(LAYOUT, HW, [(1, 1, 3, 4)], seed=seed)
    return mask, q, k, v


def _call(q, k, v, mask):
    return make_call(SITE, mask, HW, LAYOUT, q, k, v, SCALE)


@dataclass(eq=False)
class SwapKV(ProjectionOp):
    """MasaCtrl-style: every row attends to its source row's keys and values."""

    def project(self, call):
        call.set_own_kv(call.take(call.key, "src"), call.take(call.value, "src"))


@dataclass(eq=False)
class ScaleQuery(ProjectionOp):
    factor: float = 2.0

    def project(self, call):
        call.set_query(call.query * self.factor)


def test_projection_reads_other_rows_and_reweights_act_on_the_result():
    mask, q, k, v = _case()
    state, call = _call(q, k, v, mask)
    ops = ActiveOps.of([SwapKV("a", site=SITE), ScaleQuery("b", site=SITE, factor=1.5),
                        RegionMaskOp("c", site=SITE, tau=0.1)])
    out = compute(call, ops)
    qd, kd, vd = q.double() * 1.5, k.double()[SOURCE], v.double()[SOURCE]
    m = soft_mask(state.mask(SITE.level).double(), 0.1)[0]
    w = m[:, None] * m[None, :] + (1 - m)[:, None] * (1 - m)[None, :]
    expected = (w * softmax_attention(qd, kd, SCALE)) @ vd
    assert (out.double() - expected).abs().max() < 1e-5


def test_projection_contract_errors():
    mask, q, k, v = _case()
    _, call = _call(q, k, v, mask)
    with pytest.raises(ValueError, match="set_query needs shape"):
        call.set_query(q[:, :, :3])
    call.append_keys(k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match="projections run before key/value ops"):
        call.set_own_kv(k, v)


def test_take_names_a_missing_partner():
    mask, q, k, v = _case()
    state, _ = _call(q, k, v, mask)
    from attnctl.call import AttentionCall

    call = AttentionCall(SITE, state, q[:2], k[:2], v[:2], None, SCALE, rows=(0, 1))
    with pytest.raises(RunError, match="'src' row beside row 0 is not in this call"):
        call.take(q[:2], "src")


@dataclass(eq=False)
class ContrastClip(MapOp):
    """Cross-image attention's contrast on probabilities plus a logit offset on the first key (row-local edits)."""

    seen: list = field(default_factory=list)

    def edit_logits(self, call, queries, logits):
        return logits + torch.linspace(0, 1, logits.shape[-1])

    def edit_probs(self, call, queries, probs):
        n = probs.shape[-1]
        return ((probs - 1 / n) * 1.67 + 1 / n).clamp(0, 1)

    def read(self, call, queries, probs):
        self.seen.append((queries, probs.shape))


def _contrast_naive(q, k, v):
    logits = q.double() @ k.double().transpose(-1, -2) * SCALE + torch.linspace(0, 1, N).double()
    p = logits.softmax(-1)
    p = ((p - 1 / N) * 1.67 + 1 / N).clamp(0, 1)
    return p @ v.double()


@pytest.mark.parametrize("chunk", [1, 7, None])
def test_map_op_in_query_chunks_equals_the_whole_map(chunk):
    mask, q, k, v = _case()
    state, call = _call(q, k, v, mask)
    op = ContrastClip("m", site=SITE, query_chunk=chunk)
    out = compute(call, ActiveOps.of([op]))
    assert (out.double() - _contrast_naive(q, k, v)).abs().max() < 1e-5
    size = chunk or N
    assert [s.stop - s.start for s, _ in op.seen] == [min(size, N - i) for i in range(0, N, size)]
    report = state.report()["explicit_maps"][SITE.key]
    assert report == {"query_chunk": size, "bytes": 4 * 2 * size * N * 4}  # rows x heads x chunk x keys x fp32


def test_observer_is_a_map_op_that_sees_the_whole_map_after_edits():
    mask, q, k, v = _case()
    _, call = _call(q, k, v, mask)

    @dataclass(eq=False)
    class Look(ObserveOp):
        seen: list = field(default_factory=list)

        def observe(self, call, probs):
            self.seen.append(probs)

    look = Look("z", site=SITE, query_chunk=3, passes=frozenset({"main"}))  # an observer ignores chunking
    compute(call, ActiveOps.of([ContrastClip("m", site=SITE, query_chunk=5), look]))
    assert len(look.seen) == 5 and sum(p.shape[-2] for p in look.seen) == N  # the map op's chunks rule
    look2 = Look("z", site=SITE, passes=frozenset({"main"}))
    compute(_call(q, k, v, mask)[1], ActiveOps.of([look2]))
    assert len(look2.seen) == 1 and look2.seen[0].shape == (4, 2, N, N)


def on_row(call, value: float, others: float, row: int = 1) -> torch.Tensor:
    """[B, 1, 1, 1]: ``value`` on batch row ``row``, ``others`` elsewhere (per-row branch weights)."""
    w = torch.full((call.query.shape[0], 1, 1, 1), others)
    w[row] = value
    return w


@dataclass(eq=False)
class P2PLike(BranchOp):
    """Prompt-to-Prompt's cross edit as two terms on the cond main row: source map on alpha-scaled values + own map."""

    alpha: torch.Tensor = None

    def main_weight(self, call):
        return on_row(call, 0.0, 1.0)

    def branches(self, call):
        on = on_row(call, 1.0, 0.0)
        a = self.alpha.to(call.value.dtype)[:, None]
        return [Branch(on, query=call.take(call.query, "src"), key=call.take(call.key, "src"), value=a * call.value),
                Branch(on, value=(1 - a) * call.value)]


def test_branches_sum_weighted_attention_terms():
    mask, q, k, v = _case()
    _, call = _call(q, k, v, mask)
    alpha = torch.rand(N)
    out = compute(call, ActiveOps.of([P2PLike("p", site=SITE, alpha=alpha)]))
    qd, kd, vd, a = q.double(), k.double(), v.double(), alpha.double()[:, None]
    expected = softmax_attention(qd, kd, SCALE) @ vd
    expected[1] = (softmax_attention(qd[3:4], kd[3:4], SCALE) @ (a * vd[1:2]))[0] \
        + (softmax_attention(qd[1:2], kd[1:2], SCALE) @ ((1 - a) * vd[1:2]))[0]
    assert (out.double() - expected).abs().max() < 1e-5


@dataclass(eq=False)
class Identity(BranchOp):
    """Perturbed-attention guidance on row 1: its output is its values (identity map)."""

    def main_weight(self, call):
        return on_row(call, 0.0, 1.0)

    def branches(self, call):
        return [Branch(on_row(call, 1.0, 0.0), identity=True)]


def test_identity_branch_returns_the_values():
    mask, q, k, v = _case()
    _, call = _call(q, k, v, mask)
    out = compute(call, ActiveOps.of([Identity("pag", site=SITE)]))
    assert torch.equal(out[1], v[1])
    assert (out[0].double() - softmax_attention(q[:1].double(), k[:1].double(), SCALE)[0] @ v[0].double()).abs().max() < 1e-5
