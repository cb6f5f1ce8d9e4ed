"""Strategies compose: every pair of the built-ins and the example plugin, and all of them together,
at the same sites and at different sites, equal the naive composition of their literal equations.

Each case is one denoising step at a timestep inside and one outside the gates' window, on a
tiny UNet with a CFG batch of two images with different masks: the fast path (``attnctl.attach``
+ ``Controller.run``; the scheduler's ``scale_model_input`` then the UNet, as a pipeline calls
them) against ``reference_composition.NaiveComposer`` (literal processors on every site). Both
passes are compared: the guided latent z' (the guidance pass: gradients through every active
self-attention edit into the cross-attention maps the loss reads) and the noise prediction of
the main pass made from it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn import functional as F

import attnctl
from attnctl.attention import compute
from attnctl import BatchLayout, StrategyManager
from attnctl.testing import build_tiny_inpaint_pipeline
from example_plugin import load_region_boost
from reference_attention import single_thread
from reference_composition import NaiveComposer, NaiveRun
from strategies import kv_bank, latent_guidance, probe_curves, region_mask, timestep_gate

_one_thread = pytest.fixture(autouse=True)(single_thread)
# steps outside a gate window are the point here, not a user mistake
pytestmark = pytest.mark.filterwarnings("ignore::attnctl.RunWarning")

LATENT = (16, 12)  # a 128 x 96 image
STEPS = 10  # DDIM: t = 901, 801, ..., 1
CHECK_STEPS = (0, 7)  # t/T = 0.901 (inside the gate window) and 0.201 (outside)
TOKENS = [[1, 2, 3, 4, 5], [1, 2, 3]]
TOLERANCE = 1e-5

SITES = {  # where the self-attention strategies act
    "same": {"rm": "self[6:12]", "kv": "self[6:12]", "boost": "self[6:12]"},
    "different": {"rm": "self[2:6]", "kv": "self[10:16]", "boost": "self[6:10]"},
}
NAMES = ("rm", "kv", "lg", "tg", "boost", "probe")


def _config(members: tuple[str, ...], placement: str) -> dict:
    sites = SITES[placement]
    strategies: dict[str, dict] = {}
    if "rm" in members:
        strategies["rm"] = {"strategy": "region_mask", "sites": sites["rm"], "tau": 0.2}
    if "kv" in members:
        strategies["kv"] = {"strategy": "kv_bank", "sites": sites["kv"], "scale": 1.4}
    if "boost" in members:
        strategies["boost"] = {"strategy": "region_boost", "sites": sites["boost"], "gain": 2.5}
    if "lg" in members:
        strategies["lg"] = {"strategy": "latent_guidance", "read_sites": "cross/4,cross/2", "step_size": 20.0,
                            "stop_early": True}
    if "tg" in members:  # gates every other member to the early steps
        strategies["tg"] = {"strategy": "timestep_gate", "rules": {n: {"min": 0.5} for n in strategies}}
    return strategies


def _probes(members: tuple[str, ...]) -> dict:
    """The curves probe (measure ops at every self and the read cross sites) when ``probe`` is a member."""
    return {"pr": {"strategy": "curves", "enabled": True}} if "probe" in members else {}


CASES = [
    pytest.param(members, placement, id=f"{'+'.join(members)}@{placement}")
    for members in [*itertools.combinations(NAMES, 2), NAMES]
    for placement in SITES
]


@pytest.fixture(scope="module")
def case_inputs():
    pipe = build_tiny_inpaint_pipeline(0)
    pipe.scheduler.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(4, 9, *LATENT, generator=g)
    emb = torch.randn(4, 77, 32, generator=g)
    masks = torch.zeros(2, 1, 128, 96)
    masks[0, :, 32:96, 24:72] = 1
    masks[1, :, 0:48, 40:96] = 1
    manager = StrategyManager(plugins=[region_mask, kv_bank, latent_guidance, timestep_gate, probe_curves,
                                       load_region_boost()], autoload=False)
    return pipe, sample, emb, masks, manager


def _fast(pipe, manager, config, sample, emb, masks, t, measured=None):
    """The fast path on one step: (noise prediction, guided latent or None); probe values into ``measured``."""
    layout = BatchLayout.for_pipeline(2, 1, cfg=True)
    with attnctl.attach(pipe, config, manager) as ctl:
        with ctl.run(layout, mask=masks, token_indices=TOKENS) as state:
            x = pipe.scheduler.scale_model_input(sample[:, :4], t)
            with torch.no_grad():
                eps = pipe.unet(torch.cat([x, sample[:, 4:]], 1), t, encoder_hidden_states=emb).sample
            pending = state.pending_latents
    if measured is not None and "pr" in state.results:
        for quantity, by_site in state.results["pr"].series.items():
            for site, by_image in by_site.items():
                for image, (value,) in by_image.items():
                    measured[(quantity, site, image)] = value
    return eps, pending


def _naive(pipe, config, sample, emb, masks, t, step_index, measured=None):
    run = NaiveRun(config=config, images=[0, 1, 0, 1], cond_rows=[2, 3], pixel_masks=masks, tokens=TOKENS,
                   latent_hw=LATENT, step_index=step_index, num_steps=STEPS)
    out = NaiveComposer(pipe.unet, run).step(sample, t, emb)
    if measured is not None:
        measured.update(run.measured)
    return out


@pytest.mark.parametrize("members,placement", CASES)
def test_composition_matches_the_naive_composition(case_inputs, members, placement):
    pipe, sample, emb, masks, manager = case_inputs
    config = {"strategies": _config(members, placement), "probes": _probes(members)}
    for k in CHECK_STEPS:
        t = float(pipe.scheduler.timesteps[k])
        measured, measured_ref = {}, {}
        eps, z = _fast(pipe, manager, config, sample, emb, masks, t, measured)
        eps_ref, z_ref = _naive(pipe, config, sample, emb, masks, t, k, measured_ref)
        assert (z is None) == (z_ref is None), f"guidance ran in one path only at t={t}"
        if z is not None:
            assert (z - z_ref).abs().max().item() <= TOLERANCE, f"guided latent at t={t}"
            assert (z - sample[2:, :4]).abs().max() > 1e-3  # the guidance step did move z
        assert (eps - eps_ref).abs().max().item() <= TOLERANCE, f"noise prediction at t={t}"
        assert set(measured) == set(measured_ref), f"probe quantities at t={t}"
        for key, value in measured.items():  # the probe's fused measurements = the literal ones
            assert abs(value - measured_ref[key]) <= TOLERANCE, f"{key} at t={t}: {value} vs {measured_ref[key]}"


def test_the_composition_is_not_trivial(case_inputs):
    """Each member changes the full composition's output: no strategy is silently idle in it."""
    pipe, sample, emb, masks, manager = case_inputs
    t = float(pipe.scheduler.timesteps[0])
    full = {"strategies": _config(NAMES, "same")}
    eps_full, _ = _fast(pipe, manager, full, sample, emb, masks, t)
    for name in ("rm", "kv", "lg", "boost"):
        without = {"strategies": {k: v for k, v in full["strategies"].items() if k != name}}
        without["strategies"]["tg"]["rules"].pop(name)
        eps, _ = _fast(pipe, manager, without, sample, emb, masks, t)
        assert (eps - eps_full).abs().max() > 1e-4, f"removing {name} changed nothing"


def test_appended_keys_keep_weight_one_under_any_reweighting(case_inputs):
    """The contract directly: with a bank appended, reweighting own keys by W equals
    softmax over [own; bank] with own weights multiplied by W and bank weights left alone."""
    from attnctl import ActiveOps, Site
    from reference_attention import make_call, random_case

    plugin = load_region_boost()
    layout = BatchLayout.for_pipeline(1, 2, cfg=True)
    hw = (6, 8)
    mask, q, k, v = random_case(layout, hw, [(1, 2, 4, 6), (0, 0, 3, 8)])
    site = Site("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", "up", 7, 0)
    _, call = make_call(site, mask, hw, layout, q, k, v, 16**-0.5)
    ops = ActiveOps(key_value=(kv_bank.KvBankOp("kv", site=site, scale=1.4),),
                    reweight=(plugin.RegionBoostOp("boost", site=site, gain=3.0, renormalize=True),))
    out = compute(call, ops)
    rows = F.interpolate(mask, size=hw).flatten(1)[list(layout.images)].double()
    n = hw[0] * hw[1]
    keys, values = call.key.double(), call.value.double()  # own + appended, after the call
    bias = call.bias.double()
    a = torch.softmax(q.double() @ keys.transpose(-1, -2) * 16**-0.5 + bias, dim=-1)
    w = torch.ones_like(a)
    w[..., :n] = (1 + 2.0 * rows)[:, None, None, :]
    a = w * a
    ref = (a / a.sum(-1, keepdim=True)) @ values
    assert call.key.shape[-2] > n  # the bank was appended
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_literal_steer_loss_equals_the_loop_reference():
    import reference_guidance as ref_g
    from reference_composition import steer_loss_literal

    g = torch.Generator().manual_seed(0)
    maps = [(torch.softmax(torch.randn(4, n, 77, generator=g, dtype=torch.float64) * 3, -1), grid)
            for n, grid in ((48, (8, 6)), (48, (8, 6)), (12, (4, 3)))]
    masks = {(8, 6): (torch.rand(48, generator=g) > 0.5).double(), (4, 3): (torch.rand(12, generator=g) > 0.5).double()}
    fast = steer_loss_literal(maps, masks, [1, 2, 3])
    loop = ref_g.steer_loss_reference([maps], [masks], [[1, 2, 3]])
    assert abs(float(fast) - float(loop)) <= 1e-9 * abs(float(loop))
