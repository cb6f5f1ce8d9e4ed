"""``attnctl bench --predict``: peak memory and FLOPs on fake tensors, and the controls that keep it honest.

- the byte counter sees a known allocation and its release (and nothing else);
- on fake tensors it predicts what the same step allocates and computes with real tensors;
- an attached-but-idle controller predicts exactly stock, while HarmonPaint's steer pass costs more.
"""

from __future__ import annotations

import json

import pytest
import torch

from harmonpaint_recipe.bench.predict import TensorBytes, flop_counter, predict


def test_the_byte_counter_sees_an_allocation_and_its_release():
    meter = TensorBytes()
    with meter:
        a = torch.empty(1000, dtype=torch.float32)
        b = a.view(10, 100)  # a view shares the storage: not counted twice
        assert meter.current == 4000 and meter.peak == 4000
        del a, b
        assert meter.current == 0
        c = torch.empty(250, dtype=torch.float16)
    assert meter.peak == 4000 and meter.current == 500
    del c


def test_attention_flops_are_counted_on_the_cpu_kernel():
    """torch counts no FLOPs for CPU attention; the predictor's formula counts QK^T and AV (and twice that
    and more backward), or attention-heavy variants would look free."""
    b, h, s, d = 2, 4, 64, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    with flop_counter() as flops:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert flops.get_total_flops() == 2 * (2 * b * h * s * s * d)
    with flop_counter() as flops:
        out.sum().backward()
    assert flops.get_total_flops() > 2 * (2 * b * h * s * s * d)


def _real_stock_step(size: int = 64):
    """The predictor's stock step with real tensors (fp32, tiny): bytes and FLOPs as measured."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from attnctl.testing import SD_DDIM_SCHEDULER_CONFIG
    from attnctl.testing.tiny import TINY_UNET_CONFIG

    unet = UNet2DConditionModel(**TINY_UNET_CONFIG).eval()
    scheduler = DDIMScheduler.from_config(SD_DDIM_SCHEDULER_CONFIG)
    scheduler.set_timesteps(1)
    t = int(scheduler.timesteps[0])
    h = size // 8
    latents, extra, text = torch.randn(1, 4, h, h), torch.randn(2, 5, h, h), torch.randn(2, 77, 32)
    meter = TensorBytes()
    meter.add(*unet.parameters(), *unet.buffers(), latents, extra, text)
    with meter, flop_counter() as flops, torch.no_grad():
        sample = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps = unet(torch.cat([sample, extra], dim=1), t, text).sample
        scheduler.step(eps.chunk(2)[-1], t, latents)
    return meter.peak, flops.get_total_flops()


def test_fake_prediction_equals_the_real_step():
    peak, flops = _real_stock_step()
    (predicted,) = predict("tiny", 64, ["stock"], steps=1, dtype=torch.float32)
    # the same operations: FLOPs equal; bytes equal up to scalars (a fake 0-dim index result is its own
    # 8-byte storage where the real one is a view): 8 bytes of 10 MB
    assert predicted.flops == flops
    assert abs(predicted.peak_bytes - peak) <= 64


def test_idle_predicts_stock_and_the_steer_pass_costs_more():
    stock, idle, harmonpaint = predict("tiny", 64, ["stock", "idle", "harmonpaint"], steps=10, dtype=torch.float32)
    assert (idle.peak_bytes, idle.flops) == (stock.peak_bytes, stock.flops)
    assert harmonpaint.peak_bytes > stock.peak_bytes and harmonpaint.flops > stock.flops
    # the steer pass runs in the structure phase only (t >= 0.6 T): two groups of steps, 4 and 6 of 10
    assert [g["steps"] for g in harmonpaint.step_groups] == [4, 6]
    assert harmonpaint.step_groups[1]["flops"] < harmonpaint.step_groups[0]["flops"]


def test_predict_command_writes_its_tables(tmp_path, capsys):
    from attnctl.cli import main

    assert main(["bench", "--predict", "--arch", "tiny", "--steps", "4", "--variants", "idle,p2p",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "predict.json").read_text())
    variants = result["tiny@64"]["variants"]
    assert list(variants) == ["stock", "idle", "p2p"]
    assert variants["idle"]["flop_ratio"] == 1.0 and variants["p2p"]["flop_ratio"] > 1.5  # a source row per image
    assert "| p2p |" in (tmp_path / "predict.md").read_text()
    capsys.readouterr()
    assert main(["bench", "--predict", "--arch", "tiny", "--variants", "naive", "--out", str(tmp_path)]) == 2
    assert "naive builds its own processors" in capsys.readouterr().err
