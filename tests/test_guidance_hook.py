"""The latent-guidance extension point, with a toy strategy."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

import attnctl
from attnctl import BatchLayout, StrategyManager
from toy_strategies import ShiftPlugin, run_pipe


def _noise(seed=1):
    return randn_tensor((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_guidance_updates_z_before_the_first_noise_prediction(tiny_pipe, image_and_mask):
    """Shifting z_0 by +0.25 before step 0 equals starting the stock pipeline from z_0 + 0.25."""
    image, mask = image_and_mask
    noise = _noise()
    plugin = ShiftPlugin()
    manager = StrategyManager(plugins=[plugin], autoload=False)
    seen_inputs = []
    with attnctl.attach(tiny_pipe, {"strategies": {"toy_shift": {"amount": 0.25}}}, manager=manager) as ctl:
        # registered after attach, so it sees the UNet input after attnctl's pre-hook
        hook = tiny_pipe.unet.register_forward_pre_hook(
            lambda m, a, k: seen_inputs.append((a or (k["sample"],))[0].clone()), with_kwargs=True
        )
        with ctl.run(BatchLayout.for_pipeline(1), mask=torch.from_numpy(np.array(mask) / 255.0)):
            guided = run_pipe(tiny_pipe, image, mask, latents=noise)
    hook.remove()
    op = plugin.ops[0]
    assert [step for step, _ in op.seen] == [0]
    assert torch.equal(op.seen[0][1], noise)
    # the pipeline's first (main) UNet call already saw the shifted latent, in both CFG rows
    main_first = [x for x in seen_inputs if x.shape[0] == 2][0]
    assert torch.equal(main_first[:, :4], torch.cat([noise + 0.25] * 2))
    stock = run_pipe(tiny_pipe, image, mask, latents=noise + 0.25)
    assert np.array_equal(guided, stock)


def test_guidance_every_step_continues_from_guided_latents(tiny_pipe, image_and_mask):
    """Shifting z_t before every step equals the stock pipeline shifted by a step-end callback."""
    image, mask = image_and_mask
    plugin = ShiftPlugin()
    manager = StrategyManager(plugins=[plugin], autoload=False)
    config = {"strategies": {"toy_shift": {"amount": -0.1, "first_step_only": False}}}
    with attnctl.attach(tiny_pipe, config, manager=manager) as ctl:
        with ctl.run(BatchLayout.for_pipeline(1, cfg=False), mask=torch.from_numpy(np.array(mask) / 255.0)):
            guided = run_pipe(tiny_pipe, image, mask, cfg=False, latents=_noise(), steps=3)
    assert [s for s, _ in plugin.ops[0].seen] == [0, 1, 2]

    def shift_next_step(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] - 0.1} if i < 2 else {}

    stock = tiny_pipe(
        ["a cat"], image=image, mask_image=mask, num_inference_steps=3, guidance_scale=1.0, height=64, width=64,
        latents=_noise() - 0.1, generator=torch.Generator().manual_seed(0), output_type="np",
        callback_on_step_end=shift_next_step,
    ).images
    assert np.array_equal(guided, stock)


def test_guidance_pass_uses_conditional_rows_only(tiny_pipe, image_and_mask):
    image, mask = image_and_mask
    plugin = ShiftPlugin()
    manager = StrategyManager(plugins=[plugin], autoload=False)
    batches = []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda m, a, k: batches.append((a or (k["sample"],))[0].shape[0]), with_kwargs=True)
    with attnctl.attach(tiny_pipe, {"strategies": {"toy_shift": {}}}, manager=manager) as ctl:
        with ctl.run(BatchLayout.for_pipeline(2, 2, cfg=True), mask=torch.ones(64, 64)):
            run_pipe(tiny_pipe, image, mask, prompts=("a", "b"), num_images_per_prompt=2, steps=2)
    hook.remove()
    # step 0: main call (8 rows) announced first, then the guidance pass on the 4 cond rows
    assert batches == [8, 4, 8]
