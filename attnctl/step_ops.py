"""Step ops: what a strategy does in the denoising loop itself, outside any attention call.

- ``PredictionOp.combine`` turns the noise predictions of every row into the guided
  prediction of each image (classifier-free guidance is what the pipeline does without
  one; scheduled CFG is another). attnctl writes the
  result into every branch row of the image, so the pipeline's own combination
  ``u + g (c - u)`` hands it on unchanged. At most one prediction op may be planned.
- ``GuidanceTermOp.term`` adds a term to that prediction (perturbed-attention guidance
  ``s (c - c_perturbed)``, redirection guidance); several compose, in instance-name order.
- ``PostStepOp.apply`` edits the latents right after ``scheduler.step`` (every step,
  the last one included, so the final latent is edited too), e.g. Prompt-to-Prompt's
  local blend.
- ``NoiseOp.noise`` provides the variance noise of a stochastic scheduler's step (DDIM
  with eta > 0 takes ``variance_noise``).

Each gets a ``StepView``: the run state, the step's noise predictions and timestep, the
guidance scale, and the latents of rows strategies added.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from attnctl.ops import MAIN, Op

if TYPE_CHECKING:
    import torch

    from attnctl.interfaces import RunView


class StepView(Protocol):
    """What a step op sees of the step."""

    state: RunView
    timestep: float
    guidance_scale: float
    #: noise and post-step ops: the prediction and the sample ``scheduler.step`` got, and the scheduler
    model_output: torch.Tensor | None
    sample: torch.Tensor | None
    scheduler: Any

    def row_latents(self, role: str) -> torch.Tensor:
        """Sample-space latents ``[n, C, h, w]`` of the rows of ``role`` (after their step, in a post-step op)."""
        ...

    def row_prediction(self, role: str, branch: str = "cond") -> torch.Tensor:
        """The noise prediction ``[n, C, h, w]`` of the ``branch`` rows of ``role`` in this step's UNet call."""
        ...


@dataclass(eq=False)
class PredictionOp(Op):
    """Combines the rows' noise predictions into each image's guided prediction."""

    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def combine(self, eps: torch.Tensor, ctx: StepView) -> torch.Tensor:  # pragma: no cover - interface
        """``eps`` [rows of ``ctx.state.layout``, C, h, w] -> guided predictions [num_images, C, h, w]."""
        raise NotImplementedError

    def guidance_scale(self, ctx: StepView) -> float | None:
        """The classifier-free guidance scale of the added rows attnctl denoises itself (``free``) this
        step, for methods that change the scale of every row (None, the default: the pipeline's)."""
        return None


@dataclass(eq=False)
class GuidanceTermOp(Op):
    """Adds a guidance term to each image's prediction (perturbed-attention guidance, redirection guidance).

    The step's prediction of image ``i`` is ``base_i + sum of the active terms``, the terms in
    instance-name order, ``base`` being the prediction op's result if one is active, else the
    pipeline's own combination (``u + g (c - u)`` with classifier-free guidance, ``c``
    without). Several term ops compose; each reads the rows it needs from ``eps``.
    """

    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def term(self, eps: torch.Tensor, base: torch.Tensor, ctx: StepView) -> torch.Tensor:  # pragma: no cover
        """``eps`` [rows of ``ctx.state.layout``, C, h, w], ``base`` [num_images, C, h, w] -> the term to add."""
        raise NotImplementedError


@dataclass(eq=False)
class PostStepOp(Op):
    """Edits the main latents right after ``scheduler.step``."""

    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def apply(self, latents: torch.Tensor, ctx: StepView) -> torch.Tensor:  # pragma: no cover - interface
        """``latents`` [num_images, C, h, w] (sample space, z_{t-1}) -> the latents to continue from."""
        raise NotImplementedError


@dataclass(eq=False)
class NoiseOp(Op):
    """Provides ``variance_noise`` for a stochastic scheduler's step."""

    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def noise(self, sample: torch.Tensor, ctx: StepView) -> torch.Tensor:  # pragma: no cover - interface
        """The variance noise, shaped like ``sample`` [num_images, C, h, w]."""
        raise NotImplementedError


STEP_OP_TYPES = (PredictionOp, GuidanceTermOp, PostStepOp, NoiseOp)
