"""The UNet batch of a run with added rows: build it before each main call, split it after.

``RowDriver`` implements what ``attnctl.rows`` promises. Before a main UNet call it appends
the added rows (their latents from their driver, the rest of their conditioning taken
from their partner main row, their own text embeddings); after the call it steps the
``free`` rows with classifier-free guidance and a private copy of the scheduler, applies
the run's prediction op, and hands the pipeline back its own rows only.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from attnctl.errors import ConfigError, UnsupportedModelError
from attnctl.guidance import UNetCall
from attnctl.inversion import invert_row_image, trajectory_index
from attnctl.layout import MAIN_ROLE
from attnctl.row_inputs import RowTexts, encode_image, unet_sample
from attnctl.rows import RowSpec
from attnctl.step_ops import GuidanceTermOp, PredictionOp

if TYPE_CHECKING:
    from attnctl.layout import BatchLayout
    from attnctl.run_state import RunState


class StepContext:
    """What step ops see (``attnctl.step_ops.StepView``)."""

    def __init__(self, state: RunState, timestep: float, guidance_scale: float, driver: RowDriver | None):
        self.state = state
        self.timestep = timestep
        self.guidance_scale = guidance_scale
        self._driver = driver
        #: inside ``scheduler.step`` (noise and post-step ops): what the pipeline stepped with, and the scheduler
        self.model_output: torch.Tensor | None = None
        self.sample: torch.Tensor | None = None
        self.scheduler: Any = None

    def row_latents(self, role: str) -> torch.Tensor:
        if self._driver is None or role not in self._driver.latents:
            raise KeyError(f"no latents of rows with the role {role!r} in this run")
        return self._driver.latents[role]

    def row_prediction(self, role: str, branch: str = "cond") -> torch.Tensor:
        eps = None if self._driver is None else self._driver.last_eps
        found = None if eps is None else rows_by_image(eps, self.state.layout, role, branch)
        if found is None:
            raise KeyError(f"no {branch} prediction of rows with the role {role!r} in this step")
        return found


def pipeline_guidance_scale(pipe: Any) -> float:
    """The guidance scale of the pipeline call in progress (1 without a pipeline)."""
    scale = getattr(pipe, "_guidance_scale", None)
    return 1.0 if scale is None else float(scale)


class RowDriver:
    """Adds a run's rows to each main UNet call and steps the ``free`` ones.

    Args:
        state: the run (its layout already has the added rows after the main ones).
        specs: (instance, spec) per role, in layout order.
        pipe: the pipeline (encodes prompts, gives the guidance scale), or None for a bare UNet.
        scheduler: the pipeline's scheduler (copied for ``free`` rows).
        scale: the scheduler's own ``scale_model_input`` (not attnctl's recording wrapper).
    """

    def __init__(self, state: RunState, specs: tuple[tuple[str, RowSpec], ...], pipe: Any, scheduler: Any,
                 scale: Callable | None):
        self.state = state
        self.specs = {spec.role: spec for _, spec in specs}
        self.pipe = pipe
        self.scheduler = scheduler
        self.scale = scale
        layout = state.layout
        self.num_main = len(layout.main_rows)
        self.extra = list(range(self.num_main, len(layout)))
        self.partners = [layout.partner(r, MAIN_ROLE) for r in self.extra]
        #: role -> sample-space latents [n, C, h, w] of the role's images (free, trajectory, noised)
        self.latents: dict[str, torch.Tensor] = {}
        self._schedulers: dict[str, Any] = {}
        self.texts = RowTexts(pipe)
        #: (what, role) -> made once per run: a noised row's encoded image, its noise generator
        self._once: dict[tuple[str, str], Any] = {}
        self._in_flight: Any = None  # the timestep of the extended call the forward hook has not split yet
        #: role -> ``ddim_inversion`` latents of ``inverted`` rows (made at the run's first call)
        self.inverted: dict[str, list[torch.Tensor]] | None = None
        #: the noise prediction of every row in the latest main call (``StepContext.row_prediction``)
        self.last_eps: torch.Tensor | None = None

    # ------------------------------------------------------------------ the run's first call
    def begin(self, call: UNetCall, unscaled: torch.Tensor | None) -> tuple[UNetCall, torch.Tensor | None]:
        """At the run's first main call: invert the ``inverted`` rows' images and, for a role with
        ``start_main``, put its most noisy latent in place of the main rows' initial one (in the
        UNet input and in the sample the scheduler steps from). Other calls pass through."""
        if self.inverted is not None:
            return call, unscaled
        channels = unscaled.shape[1] if unscaled is not None else call.get("sample").shape[1]
        self.inverted = {role: invert_row_image(spec, call, channels, self.state, self.pipe, self.scheduler,
                                                self.scale, self.texts)
                         for role, spec in self.specs.items() if spec.driver == "inverted"}
        start = next((spec for spec in self.specs.values() if spec.start_main), None)
        if start is None:
            return call, unscaled
        sample = call.get("sample")
        z_T = self.inverted[start.role][-1][:1]
        t = call.get("timestep")
        start_z = z_T.expand(self.num_main, *z_T.shape[1:]).to(sample.device, sample.dtype)
        x = self.scale(start_z, t) if self.scale is not None else start_z
        new_sample = torch.cat([x, sample[:, channels:]], dim=1)
        self.state.scratch_for("_attnctl").setdefault("scale_inputs", {})[self.num_main] = start_z
        self.state.pending_latents = start_z[: self.state.layout.num_images]
        return UNetCall(call.unet, *call.with_sample(new_sample)), start_z

    # ------------------------------------------------------------------ before the call
    def extend(self, call: UNetCall, timestep: float, unscaled: torch.Tensor | None) -> tuple[tuple, dict]:
        """Arguments of ``call`` with the added rows appended."""
        sample = call.get("sample")
        if sample.shape[0] != self.num_main:
            raise ConfigError(f"the UNet got {sample.shape[0]} rows, the run's layout has {self.num_main} main rows")
        channels = unscaled.shape[1] if unscaled is not None else sample.shape[1]
        raw = call.get("timestep")  # the scheduler's own timestep object (schedulers index with it)
        if isinstance(raw, torch.Tensor) and raw.ndim > 0:
            raw = raw.flatten()[0]
        timestep = raw if raw is not None else timestep
        layout = self.state.layout
        device, dtype = sample.device, sample.dtype
        parts, inputs = [], {}
        for row, partner in zip(self.extra, self.partners):
            spec = self.specs[layout.roles[row]]
            if spec.driver == "shared":
                latent = sample[partner, :channels]
            else:
                if spec.role not in inputs:  # once per role and call: every branch's row gets the same latent
                    inputs[spec.role] = self._model_input(spec, timestep, unscaled, device)
                latent = inputs[spec.role][self._image_slot(row, spec)].to(dtype)
            parts.append(torch.cat([latent, sample[partner, channels:]], dim=0))
        full_sample = torch.cat([sample, torch.stack(parts)], dim=0)
        index = torch.tensor(list(range(self.num_main)) + self.partners, device=device)
        args, kwargs = call.subset(index, full_sample)
        args, kwargs = self._own_text(UNetCall(call.unet, args, kwargs), device)
        self._in_flight = timestep
        return args, kwargs

    def _image_slot(self, row: int, spec: RowSpec) -> int:
        return self.state.layout.images[row] if spec.per_image else 0

    def _model_input(self, spec: RowSpec, timestep: float, unscaled: torch.Tensor | None, device) -> torch.Tensor:
        """UNet-input latents [n, C, h, w] of a role's images this step."""
        role = spec.role
        if spec.denoised:
            if role not in self.latents:
                self.latents[role] = self._initial(spec, unscaled, device)
                scheduler = copy.deepcopy(self.scheduler)
                for name in ("step", "scale_model_input"):  # attnctl's wrappers live on the instance
                    scheduler.__dict__.pop(name, None)
                self._schedulers[role] = scheduler
            return self._schedulers[role].scale_model_input(self.latents[role], timestep)
        if spec.driver == "inverted":
            zs, index = self.inverted[role], self.state.step_index
            if index is None:
                raise ConfigError(f"rows {role!r}: this call's timestep {timestep} is not in the scheduler's "
                                  "timesteps, so its place on the inversion is unknown")
            z = self._beside_images(spec, zs[trajectory_index(index, len(zs) - 1, spec.inversion_offset)].to(device))
        elif spec.driver == "trajectory":
            index = self.state.step_index
            if index is None or index >= len(spec.trajectory):
                raise ConfigError(f"rows {role!r}: the trajectory has {len(spec.trajectory)} latents, "
                                  f"the run is at step {index}")
            z = torch.as_tensor(spec.trajectory[index]).to(device)
        else:  # noised
            clean = self._clean(spec, unscaled, device)
            noise = spec.noise if spec.noise is not None else self._noise(spec, clean.shape)
            t = torch.as_tensor(timestep, device=device).reshape(1)
            z = self.scheduler.add_noise(clean, torch.as_tensor(noise).to(device, clean.dtype), t)
        self.latents[role] = z
        return self.scale(z, timestep) if self.scale is not None else z

    def _clean(self, spec: RowSpec, unscaled: torch.Tensor | None, device) -> torch.Tensor:
        """``noised`` rows' z_0: ``spec.clean``, or ``spec.image`` encoded once at the run's latent size."""
        if spec.clean is not None:
            return torch.as_tensor(spec.clean).to(device)
        key = ("clean", spec.role)
        if key not in self._once:
            hw = tuple(unscaled.shape[-2:]) if unscaled is not None else self.state.latent_hw
            self._once[key] = encode_image(self.pipe, spec.image, hw, spec.role)
        return self._once[key].to(device)

    def _noise(self, spec: RowSpec, shape: torch.Size) -> torch.Tensor:
        """``noised`` rows' noise this step: one seeded draw for the run, or a new draw every step."""
        if not spec.fresh_noise:
            return torch.randn(shape, generator=torch.Generator().manual_seed(spec.noise_seed or 0))
        key = ("generator", spec.role)
        if key not in self._once:
            self._once[key] = torch.Generator().manual_seed(spec.noise_seed or 0)
        return torch.randn(shape, generator=self._once[key])

    def _beside_images(self, spec: RowSpec, z: torch.Tensor) -> torch.Tensor:
        """An inverted latent ``[1, C, h, w]``, once per main image for ``per_image`` rows (one image
        inverted, beside every main image)."""
        return z.expand(self.state.layout.num_images, *z.shape[1:]) if spec.per_image else z

    def _initial(self, spec: RowSpec, unscaled: torch.Tensor | None, device) -> torch.Tensor:
        """The first latent of denoised rows: the inversion's most noisy latent, the partner images'
        initial latent, or seeded noise."""
        if spec.driver == "inverted":
            return self._beside_images(spec, self.inverted[spec.role][-1].to(device)).clone()
        if unscaled is None:
            raise UnsupportedModelError(
                f"rows {spec.role!r}: could not find the pipeline's initial latents (it did not call "
                "scheduler.scale_model_input on the UNet's batch); free rows need a pipeline that does"
            )
        layout = self.state.layout
        cond = layout.cond_rows or layout.main_rows
        n = layout.num_images if spec.per_image else 1
        if spec.noise_seed is None:
            by_image = {layout.images[r]: r for r in cond}
            return torch.stack([unscaled[by_image[i]] for i in range(n)]).clone()
        generator = torch.Generator().manual_seed(int(spec.noise_seed))
        noise = torch.randn((n, *unscaled.shape[1:]), generator=generator, dtype=torch.float32)
        return (noise * self.scheduler.init_noise_sigma).to(device, unscaled.dtype)

    def _own_text(self, call: UNetCall, device) -> tuple[tuple, dict]:
        """Put each role's own text embeddings into its conditional rows."""
        layout = self.state.layout
        hidden = call.get("encoder_hidden_states")
        added = call.kwargs.get("added_cond_kwargs")
        changed = False
        for row in self.extra:
            spec = self.specs[layout.roles[row]]
            if layout.branches[row] != "cond" or (spec.prompt is None and spec.embeds is None):
                continue
            embeds, pooled = self.texts.of(spec, device)
            if not changed:
                hidden = hidden.clone()
                added = {**added, "text_embeds": added["text_embeds"].clone()} if added and "text_embeds" in added else added
                changed = True
            if embeds.shape[1:] != hidden.shape[1:]:
                raise ConfigError(f"rows {spec.role!r}: text embeddings of shape {tuple(embeds.shape[1:])}, "
                                  f"the pipeline's are {tuple(hidden.shape[1:])}")
            hidden[row] = embeds[0].to(hidden.dtype)
            if added is not None and "text_embeds" in added:
                if pooled is None:
                    raise ConfigError(f"rows {spec.role!r}: this UNet needs pooled text embeddings (SDXL); "
                                      "give pooled= with embeds=, or a prompt")
                added["text_embeds"][row] = pooled[0].to(added["text_embeds"].dtype)
        if not changed:
            return call.args, call.kwargs
        args, kwargs = call.args, dict(call.kwargs)
        if len(args) > 2:
            args = (*args[:2], hidden, *args[3:])
        else:
            kwargs["encoder_hidden_states"] = hidden
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        return args, kwargs

    # ------------------------------------------------------------------ after the call
    def split(self, output: Any, prediction: PredictionOp | None, ctx: StepContext,
              terms: Sequence[GuidanceTermOp] = ()) -> Any:
        """Step the free rows, apply ``prediction`` and ``terms``, return ``output`` with the main rows only."""
        if self._in_flight is None:
            return output
        timestep, self._in_flight = self._in_flight, None
        eps = unet_sample(output)
        self.last_eps = eps
        scale = None if prediction is None else prediction.guidance_scale(ctx)
        scale = ctx.guidance_scale if scale is None else scale
        for role, spec in self.specs.items():
            if spec.denoised:
                guided = cfg_prediction(eps, self.state.layout, role, scale)
                step = self._schedulers[role].step(guided, timestep, self.latents[role], return_dict=False)
                self.latents[role] = step[0]
            if spec.output and role in self.latents:
                self.state.row_outputs[role] = self.latents[role]
        return main_output(output, self.num_main, prediction, ctx, terms)


def main_output(output: Any, num_main: int, prediction: PredictionOp | None, ctx: StepContext,
                terms: Sequence[GuidanceTermOp] = ()) -> Any:
    """The UNet output as the pipeline gets it: its own (first ``num_main``) rows, holding their image's
    guided prediction when a prediction op or guidance terms are active (in every branch row, so the
    pipeline's own ``u + g (c - u)`` hands it on unchanged)."""
    eps = unet_sample(output)
    main = eps[:num_main]
    if prediction is not None or terms:
        layout = ctx.state.layout
        guided = (prediction.combine(eps, ctx) if prediction is not None
                  else cfg_prediction(eps, layout, MAIN_ROLE, ctx.guidance_scale))
        for op in terms:
            guided = guided + op.term(eps, guided, ctx)
        images = torch.tensor(layout.images[:num_main], device=main.device)
        main = guided.index_select(0, images).to(main.dtype)
    return (main, *output[1:]) if isinstance(output, tuple) else output.__class__(sample=main)


def rows_by_image(eps: torch.Tensor, layout: BatchLayout, role: str, branch: str) -> torch.Tensor | None:
    """The ``branch`` rows of ``role`` in ``eps`` (rows of ``layout``), in image order; None if it has none."""
    rows = sorted(layout.rows_of(role, branch), key=lambda r: layout.images[r])
    return eps.index_select(0, torch.tensor(rows, device=eps.device)) if rows else None


def cfg_prediction(eps: torch.Tensor, layout: BatchLayout, role: str, scale: float) -> torch.Tensor:
    """[images, C, h, w] the prediction of ``role``'s rows in image order, as the pipeline computes its own:
    ``u + g (c - u)`` with classifier-free guidance, ``c`` without."""
    per_branch = {}
    for branch in ("uncond", "cond"):
        found = rows_by_image(eps, layout, role, branch)
        if found is not None:
            per_branch[branch] = found
    if "uncond" in per_branch:
        uncond, cond = per_branch["uncond"], per_branch["cond"]
        return uncond + scale * (cond - uncond)
    return per_branch["cond"]
