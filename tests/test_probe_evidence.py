"""HarmonPaint's mechanisms move the way the paper says, measured by the probes on the tiny
random-weight model (numbers in docs/probes.md, "What the probes show on the tiny model").

- SAMS (Eq. 4-7): the share of masked queries' attention on unmasked keys, as the ``curves``
  probe measures it inside the fused call, equals the value Eq. 4-7 predict from the
  unmodified map of the same call (explicit softmax of its q and k), renormalized; it falls
  as tau falls; sites without SAMS are untouched (W = 1).
- Steer loss (Eq. 8-9): the object tokens' attention inside the mask is higher with the
  steer strategy than without at every guided step, for several seeds; the logged loss falls
  within each step.
- MAKVS (Eq. 10-12): the share of masked queries' attention on the bank keys rises with
  lambda at every MAKVS site; with MAKVS at lambda <= 1 the masked region's features (channel
  mean and std of the attention output) are closer to the background's than without it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnctl.testing import build_tiny_inpaint_pipeline
from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.runner import Runner
from probe_helpers import one_unet_step
from reference_attention import single_thread

_one_thread = pytest.fixture(autouse=True)(single_thread)
SELF_SITES = [f"self[{i}]" for i in range(16)]
SAMS_SITES = SELF_SITES[2:7]
MAKVS_SITES = SELF_SITES[-8:]
CURVES = {"curves": {"enabled": True, "cross_sites": "cross[0]"}}


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_inpaint_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _value(curves, quantity: str, site: str) -> float:
    (value,) = curves.series[quantity][site][0]  # one step, image 0
    return value


def _predicted_background_share(record, site: str, tau: float | None) -> float:
    """Eq. 4-7 on the unmodified map of the call at ``site`` (cond row), renormalized, mean over masked queries."""
    q, k, scale, masks = record[site]
    a = torch.softmax(q[1].double() @ k[1].double().transpose(-1, -2) * scale, dim=-1)  # [h, HW, HW]
    m = masks[1].double()
    if tau is None:
        w = torch.ones_like(a[0])
    else:
        m_hat = (1 - tau) * m + tau / m.shape[0]  # Eq. 7
        w = m_hat[:, None] * m_hat[None, :] + (1 - m_hat)[:, None] * (1 - m_hat)[None, :]  # Eq. 4-6
    weighted = w * a
    share = (weighted * (1 - m)).sum(-1) / weighted.sum(-1)
    return share[:, m > 0.5].mean().item()


def test_sams_scales_the_background_share_as_eq_4_to_7_predict(pipe):
    taus = (1.0, 0.5, 0.2, 0.1, 0.0)
    off = one_unet_step(pipe, {"probes": CURVES}, t=900.0)["curves"]
    measured = {}
    for tau in taus:
        record = {}
        config = {"strategies": {"sams": {"strategy": "region_mask", "sites": "self[2:7]", "tau": tau}},
                  "probes": CURVES}
        curves = one_unet_step(pipe, config, record, t=900.0)["curves"]
        for site in SELF_SITES:
            predicted = _predicted_background_share(record, site, tau if site in SAMS_SITES else None)
            assert abs(_value(curves, "background_share", site) - predicted) <= 1e-5, (tau, site)
        measured[tau] = {site: _value(curves, "background_share", site) for site in SELF_SITES}
    for site in SAMS_SITES:  # falls as tau falls; tau = 0 is the hard mask: nothing on the background
        values = [measured[tau][site] for tau in taus]
        assert all(a > b for a, b in zip(values, values[1:])), (site, values)
        assert values[-1] <= 1e-6
    for site in SELF_SITES[:2]:  # before the first SAMS site nothing differs from the run without SAMS
        assert all(abs(measured[tau][site] - _value(off, "background_share", site)) <= 1e-6 for tau in taus)


def _inputs(size: int = 64):
    from PIL import Image

    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))
    mask = np.zeros((size, size), np.uint8)
    mask[16:48, 20:52] = 255
    return prepare_inputs(image, Image.fromarray(mask))


def _curves(pipe, overrides, seed):
    recipe = load_recipe("harmonpaint-sams-steer", ["model.pretrained=tiny", "sampler.steps=10",
                                                    "probes.curves.enabled=true", *overrides])
    with Runner(pipe, recipe) as runner:
        return runner(_inputs(), "a small owl", seed=seed).probes["curves"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_steer_raises_the_object_tokens_attention_in_the_mask_at_every_guided_step(pipe, seed):
    steered = _curves(pipe, [], seed)
    plain = _curves(pipe, ["strategies.steer.enabled=false"], seed)
    guided = sorted({entry["step"] for entry in steered.guidance["steer"]})
    assert guided == [0, 1, 2, 3]  # t/T >= 0.6 with 10 DDIM steps
    with_steer, without = steered.curve("object_mass")[guided], plain.curve("object_mass")[guided]
    assert (with_steer > without).all(), (with_steer, without)


def test_the_steer_loss_falls_within_each_guided_step(pipe):
    log = _curves(pipe, ["strategies.steer.iterations=3"], 0).guidance["steer"]
    for step in sorted({e["step"] for e in log}):
        losses = [e["loss"] for e in log if e["step"] == step]
        assert len(losses) == 3 and losses[0] > losses[1] > losses[2], (step, losses)


def test_makvs_bank_share_rises_with_lambda_and_features_move_toward_the_background(pipe):
    lambdas = (0.5, 1.0, 1.4, 2.0, 3.0)
    off = one_unet_step(pipe, {"probes": CURVES}, t=200.0)["curves"]
    runs = {lam: one_unet_step(pipe, {"strategies": {"makvs": {"strategy": "kv_bank", "sites": "self[-8:]",
                                                               "scale": lam}},
                                      "probes": CURVES}, t=200.0)["curves"] for lam in lambdas}
    for site in MAKVS_SITES:
        shares = [_value(runs[lam], "bank_share", site) for lam in lambdas]
        assert all(a < b for a, b in zip(shares, shares[1:])), (site, shares)
        for lam in (0.5, 1.0):
            for gap in ("mean_gap", "std_gap"):
                assert _value(runs[lam], gap, site) < _value(off, gap, site), (site, lam, gap)
    for site in SELF_SITES[:8]:  # no bank before the MAKVS sites
        assert _value(runs[3.0], "bank_share", site) == 0.0
