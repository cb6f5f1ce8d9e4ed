"""Schedulers: the user's scheduler stays in charge with HarmonPaint (``sampler.scheduler: pipeline``)."""

from __future__ import annotations

import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)

from compat_helpers import (
    assert_harmonpaint_ran,
    assert_identical,
    harmonpaint,
    idle,
    no_run_warnings,
    plain,
)

# diffusers' sigma schedulers call np.array(tensor, copy=False) (numpy 2 deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SCHEDULERS = [DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, UniPCMultistepScheduler,
              LCMScheduler]


def record_timesteps(pipe):
    """A list that fills with the timestep of every main UNet call (guidance passes included)."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(float(args[1] if len(args) > 1 else kwargs["timestep"])),
        with_kwargs=True,
    )
    return seen, handle


@pytest.mark.parametrize("scheduler_class", SCHEDULERS, ids=lambda c: c.__name__.removesuffix("Scheduler"))
def test_user_scheduler_with_harmonpaint(pipe, inputs, scheduler_class):
    scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.scheduler = scheduler
    stock = plain(pipe, inputs)
    assert_identical(idle(pipe, inputs), stock)

    seen, handle = record_timesteps(pipe)
    try:
        with no_run_warnings():  # both phases of HarmonPaint's gating fall in every 3-step schedule here
            out = harmonpaint(pipe, inputs)
    finally:
        handle.remove()
    assert_harmonpaint_ran(out, stock[0])
    # (c) the user's scheduler ran the steps (its own timesteps, e.g. DDIM 667/334/1, DPM 999/666/333)
    # and is still the pipeline's
    assert pipe.scheduler is scheduler
    assert sorted(set(seen), reverse=True) == [float(t) for t in scheduler.timesteps]


def test_recipe_scheduler_is_swapped_in_for_the_run_and_put_back(pipe, inputs):
    """``sampler.scheduler: ddim`` (the shipped default) runs DDIM and leaves the user's scheduler in place."""
    import harmonpaint_recipe as hp

    from compat_helpers import PROMPT, SEED, recipe

    users = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler = users
    seen, handle = record_timesteps(pipe)
    try:
        hp.inpaint(inputs.image, inputs.mask, PROMPT, recipe=recipe("sampler.scheduler=ddim"), pipe=pipe, seed=SEED)
    finally:
        handle.remove()
    ddim = DDIMScheduler.from_config(users.config)
    ddim.set_timesteps(3)
    assert sorted(set(seen), reverse=True) == [float(t) for t in ddim.timesteps]
    assert pipe.scheduler is users
