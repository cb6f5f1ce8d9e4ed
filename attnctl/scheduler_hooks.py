"""What attnctl does around the pipeline's scheduler during a run.

``wrap_scheduler`` replaces ``scale_model_input`` and ``step`` on the scheduler instance
(presenting the originals' signatures, since pipelines pass ``eta`` or ``generator`` only to
a step that names them) and returns the function that puts back what was there:

- ``scale_model_input`` records the unscaled latents by batch size (latent guidance and
  ``free`` rows start from them);
- ``step`` steps from the guided latents when latent ops updated them, counts the steps
  (``RunState.steps_done``: a schedule may repeat a timestep), hands a noise op's variance
  noise to the scheduler and runs the post-step ops on what it returns.
"""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any, Callable

from attnctl.errors import ConfigError, UnsupportedModelError
from attnctl.step_ops import NoiseOp, PostStepOp

if TYPE_CHECKING:
    from attnctl.run_state import RunState


def wrap_scheduler(scheduler: Any, state: RunState, step_context: Callable[[RunState], Any]) -> Callable[[], None]:
    """Wrap ``scheduler`` for ``state``'s run; ``step_context(state)`` makes the step ops' view. Returns the restore."""
    # flow-matching schedulers have no scale_model_input: their model input is the sample itself
    scale, step = getattr(scheduler, "scale_model_input", None), scheduler.step
    wrapped = ("scale_model_input", "step") if scale is not None else ("step",)
    own = {name: scheduler.__dict__[name] for name in wrapped if name in scheduler.__dict__}

    # the wrappers present the originals' signatures: pipelines pass `eta`, `generator`, ... only to a
    # step whose signature names them
    def recording_scale(sample, timestep, *a, **kw):
        # by batch size: a pipeline may scale other inputs too (ControlNet's guess mode does)
        state.scratch_for("_attnctl").setdefault("scale_inputs", {})[sample.shape[0]] = sample
        return scale(sample, timestep, *a, **kw)

    @functools.wraps(step)
    def substituting_step(model_output, timestep, sample=None, *a, **kw):
        pending, state.pending_latents = state.pending_latents, None
        if pending is not None:
            if sample is None or pending.shape != sample.shape:
                raise UnsupportedModelError(
                    "the guided latents do not match the sample the scheduler steps from; this pipeline "
                    "steps latents of another shape than it gives the UNet, which latent guidance does not support"
                )
            sample = pending.to(sample.dtype)
        state.steps_done += 1
        noise_ops = [op for op in state.active_step_ops if isinstance(op, NoiseOp)]
        post_ops = [op for op in state.active_step_ops if isinstance(op, PostStepOp)]
        if not noise_ops and not post_ops:
            return step(model_output, timestep, sample, *a, **kw)
        ctx = step_context(state)
        ctx.model_output, ctx.sample, ctx.scheduler = model_output, sample, scheduler
        if noise_ops:
            _check_variance_noise(step, noise_ops)
            kw["variance_noise"] = noise_ops[-1].noise(sample, ctx)
            kw.pop("generator", None)  # the noise op's noise replaces what the generator would draw
        out = step(model_output, timestep, sample, *a, **kw)
        latents = out[0] if isinstance(out, tuple) else out.prev_sample
        for op in post_ops:
            latents = op.apply(latents, ctx)
        if isinstance(out, tuple):
            return (latents, *out[1:])
        out.prev_sample = latents
        return out

    if scale is not None:
        scheduler.scale_model_input = functools.wraps(scale)(recording_scale)
    scheduler.step = substituting_step
    state.steps_done = 0

    def restore():  # what the instance had before (a user's own wrapper), or the class's methods
        for name in wrapped:
            if name in own:
                setattr(scheduler, name, own[name])
            else:
                delattr(scheduler, name)

    state.scratch_for("_attnctl")["scale"] = scale
    return restore


def _check_variance_noise(step, noise_ops) -> None:
    """Refuse a noise op on a scheduler whose step takes no ``variance_noise``."""
    try:
        accepted = "variance_noise" in inspect.signature(step).parameters
    except (TypeError, ValueError):
        accepted = False
    if not accepted:
        owner = type(getattr(step, "__self__", None)).__name__
        raise ConfigError(
            f"{', '.join(f'strategies.{op.strategy}' for op in noise_ops)} provide the variance noise of each step, "
            f"but {owner}.step takes no variance_noise; use a scheduler that does (DDIM with eta > 0: "
            "sampler.scheduler=ddim and eta in the pipeline call)"
        )


