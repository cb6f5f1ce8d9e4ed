"""The example plugin in examples/ works as documented in docs/writing-strategies.md."""

from __future__ import annotations

import numpy as np
import torch

import attnctl
from attnctl import ActiveOps, BatchLayout, StrategyManager
from example_plugin import load_region_boost as _load_plugin
from reference_attention import make_call, random_case, softmax_attention
from toy_strategies import run_pipe


def test_example_plugin_matches_its_equation():
    plugin = _load_plugin()
    layout = BatchLayout.for_pipeline(1, 2, cfg=True)
    hw = (6, 8)
    mask, q, k, v = random_case(layout, hw, [(1, 2, 4, 6), (0, 0, 3, 8)])
    site = attnctl.Site("up_blocks.1.attentions.0.transformer_blocks.0.attn1", "self", "up", 7, 0)
    state, call = make_call(site, mask, hw, layout, q, k, v, 16**-0.5)
    out = call.compute(ActiveOps(reweight=(plugin.RegionBoostOp("boost", site=site, gain=3.0, renormalize=True),)))
    rows = mask[list(layout.images)].flatten(1).double()  # grid == latent here
    a = softmax_attention(q, k, 16**-0.5) * (1 + 2.0 * rows)[:, None, None, :]
    ref = (a / a.sum(-1, keepdim=True)) @ v.double()
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_example_plugin_runs_in_a_pipeline(tiny_pipe, image_and_mask):
    plugin = _load_plugin()
    image, mask = image_and_mask
    manager = StrategyManager(plugins=[plugin], autoload=False)
    assert "region_boost" in manager.strategies()
    config = {"strategies": {"boost": {"strategy": "region_boost", "sites": "self@up", "gain": 2.0}}}
    stock = run_pipe(tiny_pipe, image, mask)
    with attnctl.attach(tiny_pipe, config, manager=manager) as ctl:
        assert len(ctl.plan.site_ops) == 9  # the 9 up-block self-attention sites
        with ctl.run(BatchLayout.for_pipeline(1), mask=torch.from_numpy(np.array(mask) / 255.0)):
            boosted = run_pipe(tiny_pipe, image, mask)
    assert np.abs(boosted - stock).max() > 1e-3
