"""Rows a strategy adds to the batch: a source or reference image denoised beside the main ones.

Many attention-control methods read *another image* inside the same attention call: the
source prompt's image (Prompt-to-Prompt, MasaCtrl), a style reference (StyleAligned). A
strategy asks for such an image by planning a ``RowOp`` with a ``RowSpec``; attnctl then

- appends its rows to every main UNet call, one per CFG branch (and per image with
  ``per_image``), with the role ``spec.role`` in the run's ``BatchLayout``;
- conditions them like their partner main row (same timestep, inpainting channels, SDXL
  added conditions, ControlNet residuals, IP-Adapter embeddings) except for the text:
  the conditional rows get ``spec.prompt``'s embeddings when one is given;
- drives their latent with ``spec.driver``:

  ``"free"``       denoised on their own (classifier-free guidance with the pipeline's
                   scale, a copy of the pipeline's scheduler), starting from the partner
                   image's initial latent or from ``noise_seed``'s Gaussian noise;
  ``"shared"``     the partner main row's latent (a perturbed copy of the main image);
  ``"trajectory"`` ``trajectory[i]``, the sample-space latent of step ``i`` (an inversion);
  ``"noised"``     ``scheduler.add_noise(clean, noise, t)`` every step;
  ``"inverted"``   the DDIM inversion of ``image`` (``attnctl.inversion``), computed with the
                   stock UNet at the run's first step along the run's own timesteps: the
                   rows take its latent of each step, or with ``follow_inversion=False``
                   start from its most noisy latent and are denoised like ``free`` rows;

- keeps them out of what the pipeline returns: the pipeline sees only its own rows. With
  ``output=True`` the rows' final latents are in ``RunState.row_outputs[role]``.

Rows are independent in a UNet except through attention ops, so an added row that no op
reads across gives the main rows exactly what they would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

from attnctl.errors import ConfigError
from attnctl.layout import MAIN_ROLE
from attnctl.ops import Op

if TYPE_CHECKING:
    import torch

Driver = Literal["free", "shared", "trajectory", "noised", "inverted"]
DRIVERS: tuple[str, ...] = ("free", "shared", "trajectory", "noised", "inverted")


@dataclass(frozen=True)
class RowSpec:
    """Rows one role adds to the batch (see the module docstring).

    Attributes:
        role: the rows' role in the layout (unique in a plan; ``"main"`` is the pipeline's).
        prompt: text for the conditional rows (None: the partner main row's conditioning).
        embeds: instead of ``prompt``, text embeddings ``[1, L, D]`` (and for SDXL a pooled
            ``[1, P]`` as ``pooled``), for API use and bare UNets.
        pooled: SDXL's pooled text embedding for ``embeds``.
        driver: how the rows' latent is set each step (``DRIVERS``).
        per_image: one row per main image per branch (True) or one per branch beside image 0.
        branches: the CFG branches that get rows (default: every branch of the main rows);
            e.g. ``("cond",)`` for a perturbed copy of the conditional rows (PAG).
        noise_seed: ``free`` rows start from ``randn(seed) * init_noise_sigma`` instead of
            the partner image's initial latent.
        trajectory: ``trajectory`` driver: sample-space latents, one per step index.
        clean: ``noised`` and ``inverted`` drivers: the clean latent ``z_0`` ``[n, C, h, w]``.
        image: ``noised`` and ``inverted`` drivers, instead of ``clean``: a PIL image that the
            pipeline's VAE encodes at the run's size when the run starts (the mean of the
            latent distribution, times the VAE's scaling factor).
        noise: ``noised`` driver: the noise added each step (default ``randn(noise_seed or 0)``).
        fresh_noise: ``noised`` driver: draw new noise every step (from one generator seeded
            with ``noise_seed``) instead of adding the same noise at every step.
        output: publish the rows' final latents in ``RunState.row_outputs[role]``.
        inversion_guidance: ``inverted`` driver: the classifier-free guidance scale of the
            inversion, against the text the pipeline uses for an empty negative prompt
            (SD: the empty prompt's embedding; SDXL: zeros); 1 inverts with the conditional
            prediction alone.
        follow_inversion: ``inverted`` driver: the rows take the inversion's latent every
            step (True), or only start from its most noisy one and are then denoised with
            their own prediction (False, as MasaCtrl's real-image editing does by default).
        inversion_offset: ``inverted`` driver: start that many steps less noisy
            (``attnctl.inversion.trajectory_index``; StyleAligned's transfer uses 5).
        start_main: ``inverted`` driver: the main rows start from the inversion's last latent
            (the most noisy one) instead of the pipeline's initial noise, as MasaCtrl's
            real-image editing does.
    """

    role: str
    prompt: str | None = None
    embeds: Any = None
    pooled: Any = None
    driver: Driver = "free"
    per_image: bool = True
    branches: tuple[str, ...] | None = None
    noise_seed: int | None = None
    trajectory: Sequence[torch.Tensor] | None = field(default=None, repr=False)
    clean: Any = field(default=None, repr=False)
    noise: Any = field(default=None, repr=False)
    image: Any = field(default=None, repr=False)
    fresh_noise: bool = False
    output: bool = False
    inversion_guidance: float = 1.0
    inversion_offset: int = 0
    follow_inversion: bool = True
    start_main: bool = False

    @property
    def denoised(self) -> bool:
        """The rows are stepped with their own prediction (``free``, or an inversion they do not follow)."""
        return self.driver == "free" or (self.driver == "inverted" and not self.follow_inversion)

    def __post_init__(self) -> None:
        if not self.role or self.role == MAIN_ROLE:
            raise ConfigError(f"a RowSpec needs a role other than {MAIN_ROLE!r} (got {self.role!r})")
        if self.driver not in DRIVERS:
            raise ConfigError(f"RowSpec {self.role!r}: driver must be one of {', '.join(DRIVERS)}, got {self.driver!r}")
        if self.prompt is not None and self.embeds is not None:
            raise ConfigError(f"RowSpec {self.role!r}: give prompt or embeds, not both")
        if self.driver == "trajectory" and not self.trajectory:
            raise ConfigError(f"RowSpec {self.role!r}: the trajectory driver needs trajectory=[latent per step]")
        if self.driver in ("noised", "inverted") and (self.clean is None) == (self.image is None):
            raise ConfigError(f"RowSpec {self.role!r}: the {self.driver} driver needs clean=<z_0 latent> or "
                              "image=<PIL image>, one of them")
        if self.driver != "inverted" and (self.start_main or self.inversion_offset or self.inversion_guidance != 1.0
                                          or not self.follow_inversion):
            raise ConfigError(f"RowSpec {self.role!r}: start_main, inversion_offset, inversion_guidance and "
                              "follow_inversion are settings of the inverted driver")
        if self.inversion_offset < 0:
            raise ConfigError(f"RowSpec {self.role!r}: inversion_offset must be >= 0, got {self.inversion_offset}")
        if self.fresh_noise and self.noise is not None:
            raise ConfigError(f"RowSpec {self.role!r}: fresh_noise draws the noise; do not give noise as well")


@dataclass(eq=False)
class RowOp(Op):
    """Adds the rows of ``row`` to every main UNet call of the run (gates do not apply: rows exist all run)."""

    row: RowSpec = field(kw_only=True)


def check_roles(specs: Sequence[tuple[str, RowSpec]]) -> None:
    """Refuse two instances declaring one role (``(instance, spec)`` pairs)."""
    seen: dict[str, str] = {}
    for instance, spec in specs:
        if spec.role in seen:
            raise ConfigError(
                f"strategies.{instance} and strategies.{seen[spec.role]} both add rows with the role "
                f"{spec.role!r}; roles name one set of rows, give each its own (strategies usually take the instance name)"
            )
        seen[spec.role] = instance
