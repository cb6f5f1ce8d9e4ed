"""Latent guidance on a diffusion transformer (SD3, FLUX): the latent through the backbone's view.

Flow-matching schedulers have no ``scale_model_input``: the transformer's input is the
sample itself, so latent ops work on the sample (input space = sample space). Before a
step's transformer call, the backbone reads the latent out of the call's arguments as
``[B, C, H, W]`` (FLUX: unpacked from its 2x2 tokens; FLUX Fill's conditioning channels
stay as they are), the active latent ops update the conditional rows (their gradient pass
runs the transformer on those rows), the updated latent goes into this call and, in the
scheduler's layout, into the ``scheduler.step`` of the step, so the step continues from it.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from attnctl.guidance import run_guidance_pass, take_rows

if TYPE_CHECKING:
    from attnctl.backbones import Backbone
    from attnctl.run_state import RunState
    from attnctl.sites import Site


def keyword_arguments(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """One call's arguments by name (pipelines call transformers with keywords; positional ones are named here)."""
    if not args:
        return dict(kwargs)
    return dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)


class TransformerGuidanceContext:
    """What a latent op gets on a transformer: the run state and a conditional denoiser (``GuidanceView``)."""

    def __init__(self, state: RunState, model: torch.nn.Module, backbone: Backbone, arguments: dict[str, Any]):
        self.state = state
        self.timestep = state.timestep
        self._model, self._backbone, self._arguments = model, backbone, arguments

    def denoise_cond(self, z: torch.Tensor, stop_after: Site | None = None) -> torch.Tensor | None:
        """Run the transformer on the conditional rows with latent ``z`` [N, C, H, W], with grad.

        Returns those rows' prediction, or None when the pass ended after ``stop_after``.
        """
        rows = self.state.layout.cond_rows
        index = torch.tensor(rows, device=z.device)
        batch = len(self.state.layout.main_rows)
        arguments = {k: take_rows(v, index, batch) if k in self._backbone.batch_arguments else v
                     for k, v in self._arguments.items()}
        with torch.enable_grad():  # the input keeps z's graph even when called under no_grad
            arguments = self._backbone.with_latent(self._model, arguments, z)
        return run_guidance_pass(self._model, (), arguments, self.state, rows, stop_after)


def guide_transformer_call(state: RunState, model: torch.nn.Module, backbone: Backbone, args: tuple,
                           kwargs: dict) -> tuple[tuple, dict]:
    """Apply the step's active latent ops; return the call's arguments with the guided latent."""
    arguments = keyword_arguments(model, args, kwargs)
    layout = state.layout
    latent = backbone.latent(model, arguments)
    z = latent.index_select(0, torch.tensor(layout.cond_rows, device=latent.device)).detach()
    ctx = TransformerGuidanceContext(state, model, backbone, arguments)
    for op in state.active_latent_ops:
        z = op.guide(z, ctx).detach()
    state.pending_latents = backbone.to_sample(model, arguments, z)  # one row per image, as the scheduler steps
    images = torch.tensor([layout.images[r] for r in layout.main_rows], device=z.device)
    return (), backbone.with_latent(model, arguments, z.index_select(0, images).to(latent.dtype))
