"""Schedulers: the user's scheduler stays in charge with HarmonPaint (``sampler.scheduler: pipeline``)."""

from __future__ import annotations

import pytest
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

import attnctl
from compat_helpers import (
    assert_harmonpaint_ran,
    assert_identical,
    harmonpaint,
    idle,
    no_run_warnings,
    plain,
    running,
    strategies_config,
)

# diffusers' sigma schedulers call np.array(tensor, copy=False) (numpy 2 deprecation, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

#: (scheduler, steps): PNDM (SD 1.5 inpainting's own scheduler) needs 4 steps or more in diffusers itself
SCHEDULERS = [(DDIMScheduler, 3), (DPMSolverMultistepScheduler, 3), (EulerAncestralDiscreteScheduler, 3),
              (UniPCMultistepScheduler, 3), (LCMScheduler, 3), (PNDMScheduler, 4)]


def record_timesteps(pipe):
    """A list that fills with the timestep of every main UNet call (guidance passes included)."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(float(args[1] if len(args) > 1 else kwargs["timestep"])),
        with_kwargs=True,
    )
    return seen, handle


@pytest.mark.parametrize("scheduler_class,steps", SCHEDULERS, ids=[c.__name__.removesuffix("Scheduler") for c, _ in SCHEDULERS])
def test_user_scheduler_with_harmonpaint(pipe, inputs, scheduler_class, steps):
    scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.scheduler = scheduler
    stock = plain(pipe, inputs, steps=steps)
    assert_identical(idle(pipe, inputs, steps=steps), stock)

    seen, handle = record_timesteps(pipe)
    try:
        with no_run_warnings():  # both phases of HarmonPaint's gating fall in every 3-step schedule here
            out = harmonpaint(pipe, inputs, f"sampler.steps={steps}")
    finally:
        handle.remove()
    assert_harmonpaint_ran(out, stock[0])
    # (c) the user's scheduler ran the steps (its own timesteps, e.g. DDIM 667/334/1, DPM 999/666/333)
    # and is still the pipeline's
    assert pipe.scheduler is scheduler
    assert sorted(set(seen), reverse=True) == sorted({float(t) for t in scheduler.timesteps}, reverse=True)


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


def first_guided_unet_input(pipe, inputs, steer: bool):
    """The latent channels of the first main UNet call, with or without the steer loss (alone)."""
    config = strategies_config("strategies.sams.enabled=false", "strategies.makvs.enabled=false",
                               f"strategies.steer.enabled={str(steer).lower()}")
    seen = []
    with attnctl.attach(pipe, config) as ctl:
        with running(ctl, pipe, inputs) as call:
            # registered after attnctl's own pre-hook, so it sees the guided input
            handle = pipe.unet.register_forward_pre_hook(
                lambda module, args, kwargs: seen.append((args[0] if args else kwargs["sample"]).detach().clone()),
                with_kwargs=True,
            )
            try:
                plain(pipe, inputs, **call)
            finally:
                handle.remove()
    return next(s for s in seen if s.shape[0] == 2)[:, :4]


def test_latent_guidance_step_is_the_same_for_sigma_schedulers(pipe, inputs):
    """Same timesteps (trailing 999/666/333), same first UNet input: the steer loss should move it alike."""
    changes = {}
    for scheduler_class in (DDIMScheduler, EulerDiscreteScheduler):
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, timestep_spacing="trailing")
        guided, unguided = first_guided_unet_input(pipe, inputs, True), first_guided_unet_input(pipe, inputs, False)
        changes[scheduler_class] = (guided - unguided).abs().max().item()
    ratio = changes[EulerDiscreteScheduler] / changes[DDIMScheduler]
    assert 0.5 < ratio < 2.0, f"the steer step moves the UNet input {ratio:.4f} times as far with Euler as with DDIM"
