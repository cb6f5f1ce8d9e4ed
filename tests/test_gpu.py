"""CUDA-only checks (skipped without a GPU): idle bit-exactness, fp16 fast paths, a full recipe run.

Run them on a GPU machine with ``python -m pytest -q -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnctl
from attnctl.attention import compute
from attnctl import ActiveOps, BatchLayout, Site, StrategyManager
from reference_attention import make_call, naive_makvs, naive_sams, site_masks
from strategies.kv_bank import KvBankOp
from strategies.region_mask import RegionMaskOp
from toy_strategies import run_pipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SITE = Site("down_blocks.0.attentions.0.transformer_blocks.0.attn1", "self", "down", 0, 0)


def _case(dtype, hw=(32, 48), heads=8, d=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = BatchLayout.for_pipeline(1, 2, cfg=True)
    mask = torch.zeros(2, 1, *hw)
    mask[0, :, 4:20, 10:30] = 1
    mask[1, :, 10:32, 0:16] = 1
    n = hw[0] * hw[1]
    q, k, v = (torch.randn(len(layout), heads, n, d, generator=g) for _ in range(3))
    rows = site_masks(mask, hw, hw, list(layout.images))
    cuda = [t.to("cuda", dtype) for t in (q, k, v)]
    return layout, mask, (q, k, v), cuda, rows, hw


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sams_fp16_on_cuda_matches_reference(dtype):
    layout, mask, (q, k, v), cuda, rows, hw = _case(dtype)
    _, call = make_call(SITE, mask.cuda(), hw, layout, *cuda, 40**-0.5)
    out = compute(call, ActiveOps(reweight=(RegionMaskOp("sams", site=SITE, tau=0.1),)))
    ref = naive_sams(q, k, v, rows, 0.1, 40**-0.5)
    assert out.dtype == dtype
    assert (out.double().cpu() - ref).abs().max().item() < (2e-3 if dtype == torch.float16 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_makvs_fp16_on_cuda_matches_reference(dtype):
    layout, mask, (q, k, v), cuda, rows, hw = _case(dtype)
    _, call = make_call(SITE, mask.cuda(), hw, layout, *cuda, 40**-0.5)
    out = compute(call, ActiveOps(key_value=(KvBankOp("makvs", site=SITE, scale=1.4),)))
    ref = naive_makvs(q, k, v, rows, 1.4, 40**-0.5)
    assert out.dtype == dtype
    assert (out.double().cpu() - ref).abs().max().item() < (3e-3 if dtype == torch.float16 else 3e-2)


def test_idle_attach_is_bit_identical_on_cuda_fp16(tiny_pipe, image_and_mask):
    image, mask = image_and_mask
    pipe = tiny_pipe.to("cuda", torch.float16)
    stock = run_pipe(pipe, image, mask)
    with attnctl.attach(pipe, {}, manager=StrategyManager(autoload=False)):
        attached = run_pipe(pipe, image, mask)
    assert np.array_equal(stock, attached)


def test_harmonpaint_recipe_runs_on_cuda_fp16(image_and_mask):
    import harmonpaint_recipe as hp

    image, mask = image_and_mask
    recipe = hp.load_recipe("harmonpaint", ["model.pretrained=tiny", "model.device=cuda", "sampler.steps=4"])
    out = hp.inpaint(image, mask, "a cat", recipe=recipe, seed=0)
    arr = np.asarray(out)
    assert arr.shape == (64, 64, 3) and np.isfinite(arr).all()
