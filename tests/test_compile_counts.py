"""``torch.compile`` of the UNet with attnctl attached: graphs and graph breaks, counted (not timed).

Compiled as docs/benchmarks.md says (``pipe.unet.forward = torch.compile(pipe.unet.forward)``,
so attnctl's hooks stay eager), a whole 6-step run inside ``controller.run``, dynamo's
``eager`` backend (the graph capture without code generation). The control is stock
diffusers, compiled the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import attnctl

pytestmark = pytest.mark.slow


def _compiled_run(pipe, image_and_mask, controller=None):
    from torch._dynamo.utils import counters

    image, mask = image_and_mask
    torch._dynamo.reset()
    counters.clear()
    forward = pipe.unet.forward
    pipe.unet.forward = torch.compile(forward, backend="eager")
    kwargs = dict(prompt="a cat", image=image, mask_image=mask, num_inference_steps=6, guidance_scale=7.5,
                  output_type="latent", generator=torch.Generator().manual_seed(0))
    try:
        if controller is None:
            out = pipe(**kwargs).images
        else:
            layout = attnctl.BatchLayout.for_call(pipe, prompt="a cat", guidance_scale=7.5)
            with controller.run(layout, mask=torch.from_numpy(np.asarray(mask) / 255.0), token_indices=[[1, 2, 3, 4, 5]],
                                prompts=["a cat"]):
                out = pipe(**kwargs).images
    finally:
        pipe.unet.forward = forward
    return out, counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def test_an_idle_controller_compiles_like_stock(tiny_pipe, image_and_mask):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    stock, stock_graphs, stock_breaks = _compiled_run(tiny_pipe, image_and_mask)
    assert (stock_graphs, stock_breaks) == (1, 0)  # the control
    with attnctl.attach(tiny_pipe, {}) as ctl:
        idle, graphs, breaks = _compiled_run(tiny_pipe, image_and_mask, ctl)
    # the wrapper presents the original's signature with a class-level __call__, which dynamo traces
    assert (graphs, breaks) == (1, 0)
    assert torch.equal(idle, stock)


def test_harmonpaint_compiles_without_graph_breaks(tiny_pipe, image_and_mask):
    """The steer pass runs to the end of the UNet when the forward is compiled (an exception from a hook
    would drop the frame to eager): no graph break, one graph per grad mode and per set of active ops
    (structure phase, guidance pass, style phase), not one per step; the same image as eager."""
    from diffusers import DDIMScheduler

    from harmonpaint_recipe.loading import load_recipe, resolved
    from harmonpaint_recipe.runner import attach_config

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    config = attach_config(resolved(load_recipe("harmonpaint")))
    with attnctl.attach(tiny_pipe, config) as ctl:
        image, mask = image_and_mask
        layout = attnctl.BatchLayout.for_call(tiny_pipe, prompt="a cat", guidance_scale=7.5)
        with ctl.run(layout, mask=torch.from_numpy(np.asarray(mask) / 255.0), token_indices=[[1, 2, 3, 4, 5]],
                     prompts=["a cat"]):
            eager = tiny_pipe(prompt="a cat", image=image, mask_image=mask, num_inference_steps=6, guidance_scale=7.5,
                              output_type="latent", generator=torch.Generator().manual_seed(0)).images
        compiled, graphs, breaks = _compiled_run(tiny_pipe, image_and_mask, ctl)
    assert breaks == 0
    assert graphs <= 6
    assert (compiled - eager).abs().max() < 1e-4
