"""The steer update's readings (``step_rule``, ``step_region``): literal formulas on random
tensors, and what the first UNet call of a real run sees."""

from __future__ import annotations

import math

import pytest
import torch

import attnctl
from attnctl.errors import ConfigError
from attnctl.testing import build_tiny_inpaint_pipeline
from strategies import latent_guidance
from strategies.latent_steps import latent_update, soft_region, update_stats
import reference_guidance as ref


def manager():
    return attnctl.StrategyManager(plugins=[latent_guidance], autoload=False)


def _case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(2, 4, 8, 8, generator=g)
    z = torch.randn(2, 4, 8, 8, generator=g) * torch.tensor([1.0, 0.5]).view(2, 1, 1, 1)
    mask = torch.zeros(2, 1, 8, 8)
    mask[0, :, 2:6, 1:5] = 1
    mask[1, :, 0:3, 0:8] = 1
    return grad, z, mask


# ============================================================================ formulas
def test_paper_rule_is_alpha_times_the_gradient():
    grad, z, _ = _case()
    assert torch.equal(latent_update(grad, z, 3.0, "paper"), 3.0 * grad)


def test_normalized_rule_moves_each_image_by_alpha_of_its_latent_std():
    grad, z, _ = _case()
    u = latent_update(grad, z, 0.1, "normalized")
    for i in range(2):
        rms = float(u[i].pow(2).mean().sqrt())
        assert rms == pytest.approx(0.1 * float(z[i].std()), rel=1e-5)
        cosine = torch.nn.functional.cosine_similarity(u[i].flatten(), grad[i].flatten(), dim=0)
        assert float(cosine) == pytest.approx(1.0, abs=1e-6)  # same direction as the gradient


def test_masked_normalized_rule_takes_its_rms_inside_the_mask():
    grad, z, mask = _case()
    u = latent_update(grad, z, 0.2, "normalized", weights=mask, region=mask)
    for i in range(2):
        inside = u[i].permute(1, 2, 0)[mask[i, 0] > 0]
        assert float(inside.pow(2).mean().sqrt()) == pytest.approx(0.2 * float(z[i].std()), rel=1e-5)
        assert torch.equal(u[i] * (1 - mask[i]), torch.zeros_like(u[i]))


def test_a_zero_gradient_moves_nothing():
    _, z, mask = _case()
    for rule in ("paper", "normalized"):
        u = latent_update(torch.zeros_like(z), z, 0.5, rule, weights=mask, region=mask)
        assert torch.equal(u, torch.zeros_like(z)) and torch.isfinite(u).all()


def test_soft_region_is_one_inside_and_a_gaussian_tail_outside():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1  # a half plane: columns 0..7
    assert torch.equal(soft_region(mask, 0.0), mask)
    w = soft_region(mask, 1.0)
    assert torch.equal(w[..., :8], torch.ones_like(w[..., :8]))
    kernel = [math.exp(-t * t / 2) for t in range(-3, 4)]
    total = sum(kernel)
    for d in range(1, 5):  # column 7 + d: the kernel's mass that still falls on the mask
        expected = sum(k for t, k in zip(range(-3, 4), kernel) if 7 + d + t <= 7) / total
        assert float(w[0, 0, 5, 7 + d]) == pytest.approx(expected, abs=1e-6)
    assert float(w[..., 11:].abs().max()) == 0.0  # beyond the kernel's reach


def test_update_stats_split_the_update_by_the_mask():
    _, z, mask = _case()
    update = torch.zeros_like(z) + 2.0 * mask  # 2 inside, 0 outside
    stats = update_stats(update, z, mask)
    assert stats["update_rms_mask"] == pytest.approx(2.0 / float(z.std()), rel=1e-6)
    assert stats["update_rms_outside"] == 0.0 and stats["latent_std"] == pytest.approx(float(z.std()))


# ============================================================================ pipeline
def _first_main_call(pipe, settings, steps=2):
    noise = torch.randn(1, 4, *ref.LATENT, generator=torch.Generator().manual_seed(5))
    config = {"strategies": {"steer": {"strategy": "latent_guidance", "step_size": 5.0, **settings}}}
    history, n, first = ref.first_main_call(pipe, config, manager(), steps, noise)
    read = attnctl.select_sites("cross/4,cross/2", attnctl.describe_sites(pipe.unet))
    _, grad = ref.reference_loss_and_grad(pipe.unet, read, noise, first["sample"][1:], first["emb"][1:], first["t"],
                                          ref.mask_batch()[:1], [list(range(1, n + 1))])
    return noise, grad.float(), first["sample"], history


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = build_tiny_inpaint_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_masked_step_moves_only_the_masked_latent(tiny_pipe):
    noise, grad, sample, history = _first_main_call(tiny_pipe, {"step_region": "mask", "mask_edge": 0.0})
    latent_mask = torch.nn.functional.interpolate(ref.mask_batch()[:1], size=ref.LATENT, mode="nearest")
    expected = noise - 5.0 * grad * latent_mask
    assert grad.abs().max() > 0
    for row in (0, 1):
        assert (sample[row : row + 1, :4] - expected).abs().max() <= 1e-5
        outside = (latent_mask == 0).expand_as(noise)
        assert torch.equal(sample[row : row + 1, :4][outside], noise[outside])  # the background is not moved
    assert history[0]["update_rms_outside"] == 0.0 and history[0]["update_rms_mask"] > 0


def test_normalized_step_is_alpha_latent_stds_along_the_gradient(tiny_pipe):
    noise, grad, sample, history = _first_main_call(tiny_pipe, {"step_rule": "normalized", "step_size": 0.1})
    expected = noise - 0.1 * noise.std() * grad / grad.pow(2).mean().sqrt()
    assert (sample[1:2, :4] - expected).abs().max() <= 1e-5
    moved = (sample[1:2, :4] - noise).pow(2).mean().sqrt()
    assert float(moved) == pytest.approx(0.1 * float(noise.std()), rel=1e-4)


def test_history_records_update_sizes_and_the_loss_after(tiny_pipe):
    _, _, _, history = _first_main_call(tiny_pipe, {"record_loss_after": True}, steps=2)
    assert [h["step"] for h in history] == [0, 1]
    for h in history:
        assert {"update_rms_mask", "update_rms_outside", "latent_std", "loss_after"} <= set(h)
        assert h["update_rms_outside"] > 0  # the paper's update reaches the background too
    _, _, _, plain = _first_main_call(tiny_pipe, {}, steps=2)
    assert all("loss_after" not in h for h in plain)
    assert [h["loss"] for h in plain] == [h["loss"] for h in history]  # measuring changes nothing


@pytest.mark.parametrize("settings, message", [
    ({"step_rule": "newton"}, "step_rule"),
    ({"step_region": "ring"}, "step_region"),
    ({"mask_edge": -1.0}, "mask_edge"),
    ({"step_rule": "normalized"}, "0.1"),  # step_size 20 with the normalized rule
])
def test_bad_readings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        attnctl.attach(build_tiny_inpaint_pipeline(0), {"strategies": {"steer": {"strategy": "latent_guidance", **settings}}},
                       manager())


def test_the_paper_recipe_keeps_eq9_and_masked_step_is_the_table_row():
    from harmonpaint_recipe.loading import load_recipe, resolved
    from harmonpaint_recipe.testbed.evaluate import STEP_READINGS

    paper = resolved(load_recipe("harmonpaint"))["strategies"]["steer"]
    assert (paper["step_rule"], paper["step_region"], paper["step_size"]) == ("paper", "all", 20.0)
    shipped = resolved(load_recipe("harmonpaint-masked-step"))
    measured = resolved(load_recipe("harmonpaint", list(STEP_READINGS["full-masked-0.01"])))
    assert shipped["strategies"] == measured["strategies"]  # the recipe is the row docs/testbed.md measured
