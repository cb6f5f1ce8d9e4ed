"""Latent guidance plumbing: update z_t before a step's noise prediction.

The pipeline calls ``scheduler.scale_model_input(latents, t)`` and then the UNet. A
forward pre-hook on the UNet sees the step's inputs (timestep, conditioning channels,
text embeddings); the latents themselves are recorded unscaled from the scheduler call.
Active latent ops get the latent ``z`` (one row per image) and a ``GuidanceContext``
whose ``denoise_cond(z)`` runs the UNet on the conditional rows with gradients enabled.
The updated latent replaces the UNet input of this step and, through
``scheduler.step``, the sample the step updates, so the step continues from it.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch

from attnctl.sites import Site

if TYPE_CHECKING:
    from attnctl.run_state import RunState


#: arguments of ``UNet2DConditionModel.forward`` that carry one entry per batch row
BATCH_ARGUMENTS = frozenset({
    "sample", "timestep", "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask",
    "encoder_attention_mask", "added_cond_kwargs", "down_block_additional_residuals",
    "mid_block_additional_residual", "down_intrablock_additional_residuals",
})


def take_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """Index the batch dimension of every tensor with one, wherever it sits in ``value``.

    Applied to the batch-carrying UNet arguments only (``BATCH_ARGUMENTS``): inside them,
    tensors whose first dimension is the UNet's batch size are cut to ``rows``, in dicts,
    tuples and lists too (SDXL's ``added_cond_kwargs``, ControlNet's residual tuple,
    IP-Adapter's ``image_embeds`` list). ``cross_attention_kwargs`` pass unchanged: what they
    hold is the processors' business (IP-Adapter masks are per adapter, not per row).
    """
    if isinstance(value, torch.Tensor):
        if value.ndim > 0 and value.shape[0] == batch:
            return value.index_select(0, rows.to(value.device))
        return value
    if isinstance(value, dict):
        return {k: take_rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, list):
        return [take_rows(v, rows, batch) for v in value]
    if isinstance(value, tuple):
        return tuple(take_rows(v, rows, batch) for v in value)
    return value


@dataclass
class UNetCall:
    """The positional and keyword arguments of one UNet call, with named access."""

    unet: torch.nn.Module
    args: tuple
    kwargs: dict

    _NAMES = ("sample", "timestep", "encoder_hidden_states")

    def get(self, name: str) -> Any:
        i = self._NAMES.index(name) if name in self._NAMES else None
        if i is not None and len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name)

    def with_sample(self, sample: torch.Tensor) -> tuple[tuple, dict]:
        """Arguments of the same call with ``sample`` replaced."""
        if self.args:
            return (sample, *self.args[1:]), dict(self.kwargs)
        return self.args, {**self.kwargs, "sample": sample}

    def subset(self, rows: torch.Tensor, sample: torch.Tensor) -> tuple[tuple, dict]:
        """Arguments for a call on ``rows`` of the batch with ``sample`` as input."""
        batch = self.get("sample").shape[0]
        names = positional_names(self.unet)
        args = tuple(take_rows(a, rows, batch) if i < len(names) and names[i] in BATCH_ARGUMENTS else a
                     for i, a in enumerate(self.args))
        kwargs = {k: take_rows(v, rows, batch) if k in BATCH_ARGUMENTS else v for k, v in self.kwargs.items()}
        if args:
            args = (sample, *args[1:])
        else:
            kwargs["sample"] = sample
        return args, kwargs


def positional_names(unet: torch.nn.Module) -> tuple[str, ...]:
    """Parameter names of ``unet.forward`` in positional order (to know what positional arguments are)."""
    try:
        return tuple(inspect.signature(unet.forward).parameters)
    except (TypeError, ValueError):
        return ("sample", "timestep", "encoder_hidden_states")


class GuidanceContext:
    """What a latent op gets besides the latent: the run state and a conditional denoiser.

    Latent ops work on the step's **UNet input** latent ``x`` (what the scheduler's
    ``scale_model_input`` made of its sample ``z``; the two are equal for DDIM, and
    ``x = z / sqrt(sigma^2 + 1)`` for sigma-parametrized schedulers such as Euler), so one
    step size means the same for every scheduler.

    Attributes:
        state: the run state (``state.step_index``, ``state.timestep``, scratch, masks).
        timestep: the current timestep value.
    """

    def __init__(self, state: RunState, call: UNetCall, latent_channels: int):
        self.state = state
        self.timestep = state.timestep
        self._call = call
        self._channels = latent_channels

    def denoise_cond(self, z: torch.Tensor, stop_after: Site | None = None) -> torch.Tensor | None:
        """Run the UNet on the conditional rows with input latent ``z`` [N, C, h, w] (UNet input space), with grad.

        Returns the noise prediction of those rows. Sites read by observe ops record
        what they see into the run state while this runs. With ``stop_after``, the pass
        ends right after that site's attention ran and ``None`` is returned: layers after
        the last site a loss reads cannot change the loss, so they need not run.
        """
        state = self.state
        rows = state.layout.cond_rows
        idx = torch.tensor(rows, device=z.device)
        sample = self._call.get("sample")
        x = z
        extra = sample.index_select(0, idx)[:, self._channels :]
        if extra.shape[1]:
            with torch.enable_grad():  # the input must keep z's graph even when called under no_grad
                x = torch.cat([x, extra.to(x.dtype)], dim=1)
        args, kwargs = self._call.subset(idx, x)
        return run_guidance_pass(self._call.unet, args, kwargs, state, rows, stop_after)


def run_guidance_pass(model: torch.nn.Module, args: tuple, kwargs: dict, state: RunState, rows: tuple[int, ...],
                      stop_after: Site | None) -> torch.Tensor | None:
    """Call ``model`` as the guidance pass over ``rows`` with gradients; None if it ended at ``stop_after``."""
    kwargs = {**kwargs, "return_dict": False}
    handle = None
    # a compiled forward cannot be left by an exception from a hook (dynamo would run the whole frame
    # eagerly and compile the blocks one by one): the compiled pass runs to the end instead
    if stop_after is not None and not _is_compiled(model.forward):
        handle = model.get_submodule(stop_after.name).register_forward_hook(_stop_pass)
    try:
        with state.guidance_pass(rows), torch.enable_grad(), _weights_without_grad(model):
            return model(*args, **kwargs)[0]
    except _StopPass:
        return None
    finally:
        if handle is not None:
            handle.remove()


@contextmanager
def _weights_without_grad(module: torch.nn.Module) -> Iterator[None]:
    """The pass differentiates with respect to the latent only: weights that require grad would make
    autograd keep every layer's input for a weight gradient nobody asks for (SDXL at 1024 px: GiBs)."""
    frozen = [p for p in module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _is_compiled(forward: Any) -> bool:
    """Whether ``forward`` was replaced by ``torch.compile(...)`` (what docs/benchmarks.md shows)."""
    return hasattr(forward, "_torchdynamo_orig_callable") or hasattr(forward, "_torchdynamo_inline")


class _StopPass(Exception):
    """Raised after the last site a guidance pass needs; caught by ``denoise_cond``."""


def _stop_pass(module, args, output):
    raise _StopPass()
