"""DDIM inversion of a real image: the latents that ``RowSpec(driver="inverted")`` rows follow.

Real-image variants of MasaCtrl and StyleAligned put a real image in the batch by inverting
it: starting from its clean latent ``z_0``, the deterministic DDIM update is run backwards
along the run's own timesteps, one UNet evaluation per step, and the rows are then forced
onto that trajectory while the main rows are denoised beside them.

The inversion step from ``t_prev = t - T/n`` (``alpha_prev = final_alpha`` below zero, as the
DDIM scheduler's last step uses) up to ``t`` is::

    x0     = (z - sqrt(1 - alpha_prev) * eps(z, t)) / sqrt(alpha_prev)
    z_next = sqrt(alpha_t) * x0 + sqrt(1 - alpha_t) * eps(z, t)

with ``alpha`` the scheduler's cumulative products and ``eps`` evaluated at ``t`` (the
usual approximation ``eps(z_prev, t) ~ eps(z_t, t)``). With an inversion guidance scale
``g != 1``, ``eps = eps_u + g (eps_c - eps_u)`` with the empty prompt as ``u``.

The UNet runs in a *record pass*: only ops planned for it (``passes`` naming ``"record"``) act,
seeing the step index of each inversion timestep, so they can keep queries, keys, values or
maps by step in the run store for the main pass to replay; without them it is the stock
UNet's inversion (the authors invert before their attention editors are registered).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from attnctl.errors import ConfigError
from attnctl.row_inputs import RowTexts, encode_image, unet_sample, with_text

if TYPE_CHECKING:
    from attnctl.guidance import UNetCall
    from attnctl.rows import RowSpec
    from attnctl.run_state import RunState


def inversion_alphas(scheduler: Any, role: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The scheduler's cumulative alphas, the alpha below t = 0, and T_train; refuses schedulers that
    do not step a variance-preserving latent (their sample space is not the one DDIM inverts)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    sigma0 = float(getattr(scheduler, "init_noise_sigma", 1.0))
    if alphas is None or abs(sigma0 - 1.0) > 1e-6:
        raise ConfigError(
            f"rows {role!r}: DDIM inversion needs a scheduler that steps variance-preserving latents "
            f"(DDIM, DDPM, PNDM, DPM-Solver, UniPC); {type(scheduler).__name__} does not; use "
            "sampler.scheduler=ddim"
        )
    final = getattr(scheduler, "final_alpha_cumprod", None)
    final = alphas[0] if final is None else torch.as_tensor(final)
    train = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", len(alphas)))
    return alphas, final, train


def ddim_inversion(
    eps: Callable[[torch.Tensor, Any], torch.Tensor],
    z0: torch.Tensor,
    timesteps: Sequence[Any],
    alphas_cumprod: torch.Tensor,
    final_alpha: torch.Tensor,
    num_train_timesteps: int,
) -> list[torch.Tensor]:
    """``[z_0, z_1, ..., z_n]``: ``z_k`` after ``k`` inversion steps, so the sampling step ``i``
    (timestep ``timesteps[i]``, descending) sits at ``z_{n-i}``.

    Args:
        eps: the (guided) noise prediction ``eps(z, t)`` with ``t`` one of ``timesteps``.
        z0: the clean latent ``[n, C, h, w]`` (the VAE's latent times its scaling factor).
        timesteps: the run's sampling timesteps, descending.
        alphas_cumprod, final_alpha, num_train_timesteps: from ``inversion_alphas``.
    """
    stride = num_train_timesteps // len(timesteps)
    exact = torch.promote_types(z0.dtype, torch.float32)  # the update in fp32 at least (fp64 stays fp64)
    z, out = z0, [z0]
    for t in reversed(list(timesteps)):
        current = int(t)
        previous = min(current - stride, num_train_timesteps - 1)
        alpha_prev = alphas_cumprod[previous] if previous >= 0 else final_alpha
        alpha = alphas_cumprod[current]
        e = eps(z, t).to(exact)
        x0 = (z.to(exact) - (1 - alpha_prev) ** 0.5 * e) / alpha_prev ** 0.5
        z = (alpha ** 0.5 * x0 + (1 - alpha) ** 0.5 * e).to(z0.dtype)
        out.append(z)
    return out


def trajectory_index(step: int, num_steps: int, offset: int = 0) -> int:
    """Which inversion latent (``ddim_inversion``'s list index) the rows take at sampling ``step``.

    ``offset`` copies StyleAligned's transfer callback: the reference starts ``offset`` steps
    less noisy (``zts[offset]`` at step 0, with ``zts`` the list reversed) and keeps the
    latent of step ``offset + 1`` until the run catches up with it; 0 is the plain trajectory.
    """
    k = offset if step == 0 else max(offset + 1, step)
    if k > num_steps:
        raise ConfigError(f"the inversion offset {offset} is past the run's {num_steps} steps")
    return num_steps - k


def invert_row_image(spec: RowSpec, call: UNetCall, channels: int, state: RunState, pipe: Any, scheduler: Any,
                     scale: Callable | None, texts: RowTexts) -> list[torch.Tensor]:
    """``spec``'s image (or ``clean`` latent) inverted along the run's timesteps with the stock UNet
    (a record pass), at the run's first main ``call`` (``ddim_inversion``'s list).

    The inversion's UNet calls are conditioned like the rows' partner, the first main conditional
    row (its inpainting channels beyond the first ``channels``, SDXL's added conditions), with the
    rows' own text (or the partner's) and, with guidance, the pipeline's empty negative text.
    """
    sample = call.get("sample")
    layout = state.layout
    partner = (layout.cond_rows or layout.main_rows)[0]
    device, dtype = sample.device, sample.dtype
    if spec.clean is not None:
        z0 = torch.as_tensor(spec.clean).to(device, dtype)
    else:
        z0 = encode_image(pipe, spec.image, tuple(sample.shape[-2:]), spec.role).to(device, dtype)
    alphas, final, train = inversion_alphas(scheduler, spec.role)
    timesteps = getattr(scheduler, "timesteps", None)
    timesteps = [] if timesteps is None else list(timesteps)
    if not timesteps:
        raise ConfigError(f"rows {spec.role!r}: the scheduler has no timesteps to invert along")
    guided = spec.inversion_guidance != 1.0
    if spec.prompt is not None or spec.embeds is not None:
        cond = texts.of(spec, device)
    else:
        pooled = (call.kwargs.get("added_cond_kwargs") or {}).get("text_embeds")
        cond = (call.get("encoder_hidden_states")[partner : partner + 1],
                None if pooled is None else pooled[partner : partner + 1])
    both = [texts.empty_negative(device, spec.role), cond] if guided else [cond]
    hidden = torch.cat([h for h, _ in both]).to(dtype)
    pooled = None if cond[1] is None else torch.cat([p for _, p in both])
    index = torch.tensor([partner] * len(both), device=device)
    extra = sample[partner : partner + 1, channels:]

    def eps(z: torch.Tensor, t: Any) -> torch.Tensor:
        x = scale(z, t) if scale is not None else z
        inputs = torch.cat([x.to(dtype), extra], dim=1).expand(len(both), -1, -1, -1)
        args, kwargs = with_text(call.unet, *call.subset(index, inputs), t, hidden, pooled)
        with state.record_pass(float(t)), torch.no_grad():
            out = unet_sample(call.unet(*args, **kwargs))
        return out[-1:] if not guided else out[:1] + spec.inversion_guidance * (out[1:] - out[:1])

    state.inversions[spec.role] = {"unet_calls": len(timesteps), "rows_per_call": len(both)}
    return ddim_inversion(eps, z0[:1], timesteps, alphas.to(device), final.to(device), train)
