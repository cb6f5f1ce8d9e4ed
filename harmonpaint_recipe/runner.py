"""Run a recipe on a diffusers inpainting pipeline.

``Runner(pipe, recipe)`` attaches the recipe's strategies once; ``runner(image, mask,
prompt, seed)`` makes one image. The batch layout is built explicitly from the call
(one prompt, one image, CFG iff ``guidance_scale > 1``, as diffusers decides), the mask
is the binarized one the pipeline also gets, and the token indices are each prompt's own
tokens (between the start and end tokens) from the pipeline's tokenizer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from PIL import Image

import attnctl
from attnctl.errors import ConfigError, InputError
from attnctl.layout import BatchLayout, is_flux, pipeline_token_indices
from attnctl.layout import prompt_token_indices  # noqa: F401 - re-exported for callers
from harmonpaint_recipe.inputs import PreparedInputs
from harmonpaint_recipe.loading import resolved
from harmonpaint_recipe.model import check_pipeline
from harmonpaint_recipe.paste_back import paste_back


@dataclass
class RunResult:
    """One generated image, what is needed to reproduce it, and what the recipe's probes measured.

    ``probes`` maps each enabled probe instance (the recipe's ``probes`` section) to its
    result object (e.g. ``strategies.probe_curves.Curves``); empty when no probe is on.
    ``results`` holds what every instance published (``state.publish``), probes included
    (e.g. ``attend_excite``'s per-step losses). ``rows`` holds the images of rows a strategy added and asked to keep (e.g. Prompt-to-Prompt's
    source with ``keep_source: true``), by role; ``report`` is the run's cost report
    (``attnctl.RunState.report``: added rows, explicit maps, stores).
    """

    image: Image.Image
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    probes: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, Image.Image] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


def new_seed() -> int:
    """A fresh random seed (recorded, so the run can be reproduced)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(time.time_ns() % 2**63)))


def _step_reporter(on_step: Callable[[int, int], None]) -> Callable[..., dict]:
    """A diffusers ``callback_on_step_end`` that only reports progress (it changes nothing)."""

    def report(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        on_step(step + 1, int(pipe.num_timesteps))
        return callback_kwargs

    return report


def attach_config(config: dict[str, Any]) -> dict[str, Any]:
    """The ``attnctl.attach`` config of a resolved recipe: its ``strategies`` and its ``probes``."""
    return {"strategies": config.get("strategies") or {}, "probes": config.get("probes") or {}}


def _check_size(pipe: Any, width: int, height: int) -> None:
    """Refuse, with the fix, image sides a transformer pipeline cannot take: its VAE factor times its
    patch (SD3: ``patch_size``; FLUX: 2x2 packing), e.g. 16 for SD3 and FLUX.1 Fill."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return  # UNets: multiples of 8, checked with the inputs
    patch = getattr(transformer.config, "patch_size", 1)
    multiple = int(pipe.vae_scale_factor) * (2 if is_flux(pipe) else int(patch))
    if width % multiple or height % multiple:
        fix_w, fix_h = max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)
        raise InputError(f"image is {width}x{height}, but {type(pipe).__name__} needs width and height that are "
                         f"multiples of {multiple}; crop or resize it, e.g. to {fix_w}x{fix_h}")


def _drop_unaccepted(pipe: Any, kwargs: dict[str, Any]) -> None:
    """Leave out the arguments the pipeline's call has no parameter for when they are unset (FLUX Fill
    takes no negative prompt); refuse them, named, when the recipe sets them."""
    import inspect

    accepted = inspect.signature(type(pipe).__call__).parameters
    for name in [n for n in kwargs if n not in accepted]:
        if kwargs[name] is not None:
            raise ConfigError(f"{type(pipe).__name__} takes no {name}; remove sampler.{name} from the recipe "
                              "for this model")
        del kwargs[name]


def _recipe_scheduler(pipe: Any, name: str) -> Any:
    """The scheduler the recipe asks for, built from the pipeline's own config (``pipeline``: the pipeline's)."""
    if name == "ddim" and getattr(pipe, "unet", None) is None:
        raise ConfigError(
            f"sampler.scheduler=ddim, but {type(pipe).__name__} denoises with a flow-matching transformer that DDIM "
            "cannot drive; use sampler.scheduler=pipeline (the recipes harmonpaint-sd3 and harmonpaint-flux-fill do)"
        )
    if name == "ddim":
        from diffusers import DDIMScheduler

        if not isinstance(pipe.scheduler, DDIMScheduler):
            return DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe.scheduler


class Runner:
    """A recipe attached to a pipeline; call it once per image. Use as a context manager.

    The recipe's scheduler is swapped in while the runner is open; ``close`` detaches the
    strategies and puts the pipeline's own scheduler back.

    Args:
        pipe: an SD / SDXL inpainting pipeline, plain, with ControlNet or with PAG
            (``harmonpaint_recipe.model.SUPPORTED_PIPELINES``).
        recipe: a validated recipe (``load_recipe``).
        manager: strategy plugin manager (default: entry points).
        adapters: processor adapters for attention processors of your own (``attnctl.attach``).
    """

    def __init__(self, pipe: Any, recipe: DictConfig, manager: Any = None, adapters: Any = None):
        check_pipeline(pipe)
        self.pipe = pipe
        self.recipe = recipe
        self.config = resolved(recipe)
        self._own_scheduler = pipe.scheduler
        pipe.scheduler = _recipe_scheduler(pipe, self.config["sampler"]["scheduler"])
        try:
            self.controller = attnctl.attach(pipe, attach_config(self.config), manager, adapters=adapters)
        except BaseException:
            pipe.scheduler = self._own_scheduler
            raise

    def close(self) -> None:
        """Detach the strategies and restore the pipeline's scheduler: the pipeline is left as it was."""
        self.controller.detach()
        self.pipe.scheduler = self._own_scheduler

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, inputs: PreparedInputs, prompt: str, seed: int | None = None,
                 pipeline_kwargs: dict[str, Any] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> RunResult:
        """Inpaint ``inputs`` (from ``prepare_inputs``) with ``prompt``.

        ``pipeline_kwargs`` go to the pipeline call as they are, for what the recipe does not
        set: ``control_image`` (ControlNet), ``ip_adapter_image``, ``pag_scale``,
        ``cross_attention_kwargs``, ... ``on_step(done, total)`` is called after each
        denoising step (for progress displays).
        """
        _check_size(self.pipe, *inputs.image.size)
        sampler = self.config["sampler"]
        seed = new_seed() if seed is None else int(seed)
        guidance = float(sampler["guidance_scale"])
        extra = dict(pipeline_kwargs or {})
        layout = BatchLayout.for_call(self.pipe, prompt=prompt, num_images_per_prompt=1, guidance_scale=guidance,
                                      pag_scale=extra.get("pag_scale"))
        mask = torch.from_numpy(inputs.mask_array)
        tokens = [pipeline_token_indices(self.pipe, prompt)]  # the user's words only
        positive = sampler.get("positive_prompt")
        prompt = f"{prompt}, {positive}" if positive else prompt
        width, height = inputs.image.size
        kwargs: dict[str, Any] = dict(
            prompt=prompt,
            image=inputs.image,
            mask_image=inputs.mask,
            height=height,
            width=width,
            num_inference_steps=int(sampler["steps"]),
            guidance_scale=guidance,
            strength=float(sampler["strength"]),
            negative_prompt=sampler.get("negative_prompt"),
            num_images_per_prompt=1,
            # a CPU generator gives the same noise on every device
            generator=torch.Generator(device="cpu").manual_seed(seed),
        )
        _drop_unaccepted(self.pipe, kwargs)
        if on_step is not None:
            kwargs["callback_on_step_end"] = _step_reporter(on_step)
        clash = sorted(set(extra) & set(kwargs))
        if clash:
            raise ConfigError(
                f"pipeline_kwargs {', '.join(clash)} are set by the recipe, the inputs or on_step; change them "
                "there (e.g. sampler.steps=..., sampler.guidance_scale=...), not as pipeline arguments"
            )
        kwargs.update(extra)
        start = time.perf_counter()
        with self.controller.run(layout, mask=mask, token_indices=tokens, prompts=[prompt]) as state:
            image = self.pipe(**kwargs).images[0]
        output = self.config.get("output") or {}
        if output.get("paste_back"):
            image = paste_back(image, inputs.image, inputs.mask_array, float(output.get("paste_blur", 2.0)))
        probes = {name: state.results[name] for name in sorted(self.controller.plan.probes) if name in state.results}
        rows = {role: self._decode(latents[:1]) for role, latents in sorted(state.row_outputs.items())}
        return RunResult(image=image, seed=seed, timings={"inpaint_s": round(time.perf_counter() - start, 3)},
                         probes=probes, rows=rows, report=state.report(), results=dict(state.results))

    def _decode(self, latents: torch.Tensor) -> Image.Image:
        """A row's final latent as the pipeline would decode its own image."""
        vae = self.pipe.vae
        with torch.no_grad():
            pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")[0]
