"""The alphas of one DDIM step, for step ops that redo the scheduler's step their authors' way."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnctl.errors import ConfigError

if TYPE_CHECKING:
    import torch


def ddim_step_alphas(scheduler: Any, timestep: float, refusal: str, dtype: Any = None,
                     device: Any = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(alpha_t, alpha_prev, prev)``: the cumulative alphas at ``timestep`` and at the timestep the
    DDIM step goes to (``t - T/n``; the scheduler's final alpha below 0), in ``dtype`` on ``device``
    (default: the scheduler's). Raises ``ConfigError(refusal)`` for a scheduler that is not DDIM."""
    import torch

    final = getattr(scheduler, "final_alpha_cumprod", None)
    if final is None:
        raise ConfigError(refusal)
    t = int(timestep)
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    cumulative = scheduler.alphas_cumprod.to(device=device, dtype=dtype)
    a_prev = cumulative[prev] if prev >= 0 else torch.as_tensor(final).to(device=device, dtype=cumulative.dtype)
    return cumulative[t], a_prev, prev
