"""What the page asks for, without any web code: recipes, controls and runs on one pipeline.

``AppService`` loads the pipeline once. Every recipe picked on the page runs on that
pipeline (its ``model`` section is set to the loaded one, and the command lines shown say
so). A run checks everything first, then makes each configuration of the compare mode
with the same seed and writes, per run, a folder with the input, the mask, and every
output image with its sidecar JSON, from which ``attnctl inpaint --from`` remakes it.
"""

from __future__ import annotations

import itertools
import logging
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig
from PIL import Image

from attnctl.backbones import denoiser_of
from attnctl.errors import AttnctlError, InputError
from attnctl.plugins import StrategyManager
from harmonpaint_recipe.app.checks import MAX_SEED, check_prompt, check_seed, prompt_note
from harmonpaint_recipe.app.compare import Variant, variants
from harmonpaint_recipe.app.controls import (
    ParamControl,
    StrategyGroup,
    merge_groups,
    override_strings,
    output_controls,
    sampler_controls,
    strategy_groups,
)
from harmonpaint_recipe.inputs import PreparedInputs
from harmonpaint_recipe.files import atomic_save_image
from harmonpaint_recipe.loading import load_recipe, recipe_names, resolved
from harmonpaint_recipe.model import family_of_name, load_pipeline, model_family
from harmonpaint_recipe.probing.run import ProbeRun, token_labels
from harmonpaint_recipe.runner import Runner
from harmonpaint_recipe.sidecar import sidecar_path, sidecar_record, write_sidecar

__all__ = ["MAX_SEED", "AppService", "OutputError", "RunFailed", "RunOutput", "RunRequest", "RunStopped",
           "VariantOutput", "check_seed"]
Progress = Callable[[float, str], None]
log = logging.getLogger("attnctl.app")


class OutputError(AttnctlError):
    """The output folder cannot be written."""


class RunFailed(AttnctlError):
    """The pipeline raised during a run (the server log has the traceback)."""


class RunStopped(AttnctlError):
    """The server is stopping; the run ended at its next step."""


@dataclass
class RunRequest:
    """One click of the run button.

    Attributes:
        inputs: image and binary mask (``editor_inputs``).
        prompt: text prompt.
        seed: noise seed, the same for every configuration.
        recipe_name: recipe picked on the page.
        changes: dotted key -> value edited on the page (``ParamControl`` keys).
        mode: compare mode (``compare.MODES``).
        off_instance: for the ``one_off`` mode, the instance switched off in B.
    """

    inputs: PreparedInputs
    prompt: str
    seed: int
    recipe_name: str
    changes: dict[str, Any] = field(default_factory=dict)
    mode: str = "stock"
    off_instance: str | None = None


@dataclass
class VariantOutput:
    """One image made by a run, where it was written, and how to make it again."""

    variant: Variant
    image: Image.Image
    image_path: Path
    sidecar_path: Path
    command: str
    probe_run: ProbeRun | None = None  # what the recipe's probes measured (None: no probe was on)


@dataclass
class RunOutput:
    """Everything one run wrote."""

    run_dir: Path
    seed: int
    image_path: Path
    mask_path: Path
    outputs: list[VariantOutput]
    notes: list[str]
    seconds: float

    def files(self) -> list[Path]:
        """Downloadable files: each output with its sidecar, then the mask and the input."""
        out = [p for o in self.outputs for p in (o.image_path, o.sidecar_path)]
        return out + [self.mask_path, self.image_path]


@dataclass
class _Planned:
    variant: Variant
    recipe: DictConfig
    overrides: list[str]


def prompt_token_users(recipe: Mapping[str, Any]) -> list[str]:
    """Enabled strategy instances with ``tokens: prompt``: they need the prompt's own tokens."""
    return [name for name, settings in (recipe.get("strategies") or {}).items()
            if (settings or {}).get("enabled", True) and (settings or {}).get("tokens") == "prompt"]


class AppService:
    """The pipeline, loaded once, and the recipes and runs the page offers.

    Args:
        recipe: the recipe the page starts with (shipped name or YAML path).
        overrides: ``key=value`` overrides applied to every recipe (``model.pretrained=tiny``).
        out_dir: folder that receives one sub-folder per run.
        manager: strategy plugin manager (default: entry points).
        pipe: an already loaded pipeline (default: load the recipe's model).
    """

    def __init__(self, recipe: str, overrides: Sequence[str] = (), out_dir: str | Path = "out/app",
                 manager: Any = None, pipe: Any = None):
        self.manager = manager or StrategyManager.default()
        self.recipe_name = str(recipe)
        self.base_overrides = list(overrides)
        self.base_recipe = load_recipe(recipe, self.base_overrides, manager=self.manager)
        self.out_dir = Path(out_dir)
        start = time.perf_counter()
        self.pipe = pipe if pipe is not None else load_pipeline(self.base_recipe)
        self.load_s = round(time.perf_counter() - start, 3)
        self.pipe.set_progress_bar_config(disable=True)  # the page shows progress; the log gets a line per run
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._numbers = itertools.count(1)
        self.recipe_choices = self._recipe_choices()
        self.sampler_controls: list[ParamControl] = sampler_controls()
        self.output_controls: list[ParamControl] = output_controls()
        self.groups: list[StrategyGroup] = merge_groups(
            strategy_groups(resolved(self.recipe(name)), self.manager) for name in self.recipe_choices
        )

    @property
    def controls(self) -> list[ParamControl]:
        """Every control of the page, in the order the page passes their values."""
        return self.sampler_controls + self.output_controls + [c for g in self.groups for c in g.controls]

    @property
    def model_label(self) -> str:
        """``tiny (StableDiffusionInpaintPipeline, cpu, float32)``."""
        network = denoiser_of(self.pipe)
        return f"{self.base_recipe.model.pretrained} ({type(self.pipe).__name__}, {self.pipe.device}, {network.dtype})"

    def _recipe_choices(self) -> list[str]:
        """The start recipe, then the shipped recipes written for the loaded pipeline's family (SD, SDXL, SD3, FLUX)."""
        family = family_of_name(type(self.pipe).__name__)
        names = [self.recipe_name]
        for name in recipe_names():
            own = load_recipe(name, manager=self.manager)
            if name not in names and model_family(str(own.model.pretrained)) == family:
                names.append(name)
        return names

    def _model_changes(self, recipe: DictConfig) -> dict[str, Any]:
        """Dotted ``model.*`` values that make ``recipe`` use the loaded model."""
        loaded, own = resolved(self.base_recipe)["model"], resolved(recipe)["model"]
        return {f"model.{key}": value for key, value in loaded.items() if own.get(key) != value}

    def recipe(self, name: str, changes: Mapping[str, Any] | None = None) -> DictConfig:
        """Recipe ``name`` with the start overrides, the loaded model and ``changes``."""
        return self.effective_recipe(name, changes)[0]

    def effective_recipe(self, name: str, changes: Mapping[str, Any] | None = None) -> tuple[DictConfig, list[str]]:
        """Recipe ``name`` as the page runs it, and the overrides that say how it was made."""
        if name not in self.recipe_choices:
            raise InputError(f"recipe '{name}' is not offered here; pick one of {', '.join(self.recipe_choices)}")
        cfg = load_recipe(name, self.base_overrides, manager=self.manager)
        extra = {**self._model_changes(cfg), **dict(changes or {})}
        if extra:
            cfg = load_recipe(cfg, extra, manager=self.manager)
        return cfg, self.base_overrides + override_strings(extra)

    def command(self, name: str, overrides: Sequence[str], image: str, mask: str, prompt: str, seed: Any, out: str) -> str:
        """The ``attnctl inpaint`` line that makes the same image from the shell."""
        args = ["attnctl", "inpaint", "--recipe", name, "--image", image, "--mask", mask,
                "--prompt", prompt, "--seed", str(seed), "--out", out, *overrides]
        return " ".join(shlex.quote(a) for a in args)

    def plan(self, request: RunRequest) -> list[_Planned]:
        """Validate every configuration of ``request`` (no model work)."""
        request.prompt = check_prompt(request.prompt)
        base, base_overrides = self.effective_recipe(request.recipe_name, request.changes)
        planned = []
        for variant in variants(request.mode, request.recipe_name, resolved(base), request.off_instance):
            if variant.overrides:
                recipe = load_recipe(base, variant.overrides, manager=self.manager)
                overrides = base_overrides + override_strings(variant.overrides)
            else:
                recipe, overrides = base, base_overrides
            users = prompt_token_users(resolved(recipe))
            if not request.prompt.strip() and users:
                raise InputError(
                    f"empty prompt: {variant.label} steers the prompt's own tokens ({', '.join(users)}: tokens: prompt); "
                    "type what to paint into the region, e.g. 'a small owl'"
                )
            planned.append(_Planned(variant, recipe, overrides))
        return planned

    def _new_run_dir(self, seed: int) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for n in range(1, 1000):
            run_dir = self.out_dir / (f"{stamp}-seed{seed}" + (f"-{n}" if n > 1 else ""))
            try:
                run_dir.mkdir(parents=True)
                return run_dir
            except FileExistsError:
                continue
        raise OutputError(f"cannot make a new run folder in '{self.out_dir}'; clean it up or pass another --out-dir")

    def _unwritable(self, exc: OSError, kept: list[VariantOutput]) -> OutputError:
        where = f" '{exc.filename}'" if exc.filename else ""
        done = f"; kept: {', '.join(o.image_path.name for o in kept)} with sidecars" if kept else ""
        return OutputError(
            f"cannot write to the output folder '{self.out_dir}'{where} ({exc.strerror or exc}){done}; make the "
            "folder writable or free some space, or restart the app with another --out-dir"
        )

    def stop(self) -> None:
        """Stop serving runs: the one in progress ends at its next denoising step (``RunStopped``)."""
        self._stopping.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the run in progress to end; whether none is left."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True

    def run(self, request: RunRequest, progress: Progress | None = None) -> RunOutput:
        """Make every configuration of ``request``; requests run one at a time.

        Every file is written atomically and each output image is followed by its sidecar, so
        a failed or stopped run leaves complete files only: the outputs made before it ended.

        Raises:
            InputError, ConfigError: a bad request (nothing is written).
            OutputError: the output folder cannot be written.
            RunFailed: the pipeline raised (the server log has the traceback).
            RunStopped: the server is stopping.
        """
        request.seed = check_seed(request.seed)
        planned = self.plan(request)
        report = progress or (lambda fraction, text: None)
        with self._lock:
            if self._stopping.is_set():
                raise RunStopped("the server is stopping; run again once it is back")
            number = next(self._numbers)
            labels = " vs ".join(p.variant.label for p in planned)
            log.info("run %d started: seed %d, %s", number, request.seed, labels)
            start = time.perf_counter()
            outputs: list[VariantOutput] = []
            try:
                self._make(request, planned, report, outputs)
            except OutputError as exc:
                log.info("run %d failed: %s", number, exc)
                raise
            except RunStopped as exc:
                log.info("run %d stopped: %s", number, exc)
                raise
            except AttnctlError as exc:
                log.info("run %d refused: %s", number, exc)
                raise
            except Exception as exc:
                log.error("run %d failed in the pipeline", number, exc_info=exc)
                kept = f"; kept: {', '.join(o.image_path.name for o in outputs)} with sidecars" if outputs else ""
                reason = (str(exc).strip().splitlines() or [""])[0][:300]
                raise RunFailed(f"the run failed in the pipeline ({type(exc).__name__}: {reason}){kept}; "
                                "the server log has the details") from None
            seconds = round(time.perf_counter() - start, 2)
            run_dir = outputs[0].image_path.parent
            log.info("run %d done in %.1f s: %d image(s) with sidecars in %s", number, seconds, len(outputs), run_dir)
        notes = list(request.inputs.notes)
        note = prompt_note(self.pipe.tokenizer, request.prompt)
        if note:
            notes.append(note)
        return RunOutput(run_dir, request.seed, run_dir / f"{run_dir.name}_input.png",
                         run_dir / f"{run_dir.name}_mask.png", outputs, notes, seconds)

    def _make(self, request: RunRequest, planned: list[_Planned], report: Progress, outputs: list[VariantOutput]) -> None:
        """Write the run folder: input, mask, then per configuration its image and sidecar (appended to ``outputs``)."""
        try:
            run_dir = self._new_run_dir(request.seed)
            tag = run_dir.name
            image_path, mask_path = run_dir / f"{tag}_input.png", run_dir / f"{tag}_mask.png"
            atomic_save_image(image_path, request.inputs.image)
            atomic_save_image(mask_path, request.inputs.mask)
        except OSError as exc:
            raise self._unwritable(exc, outputs) from None
        for i, item in enumerate(planned):
            where = f"{item.variant.slot}: {item.variant.label}"
            report(i / len(planned), where)

            def on_step(done: int, total: int, i: int = i, where: str = where) -> None:
                if self._stopping.is_set():
                    raise RunStopped(f"the server is stopping; {where} ended after step {done}/{total}")
                report((i + done / total) / len(planned), f"{where}, step {done}/{total}")

            out = run_dir / f"{tag}_{item.variant.file_stem}.png"
            with Runner(self.pipe, item.recipe, manager=self.manager) as runner:
                result = runner(request.inputs, request.prompt, request.seed, on_step=on_step)
            try:
                atomic_save_image(out, result.image)
                try:
                    record = sidecar_record(
                        out=out, image=image_path, mask=mask_path, prompt=request.prompt, seed=result.seed,
                        recipe=item.recipe, recipe_name=request.recipe_name, overrides=item.overrides,
                        pipe=self.pipe, notes=request.inputs.notes, resize_mask=False,
                        timings={"load_s": self.load_s, **result.timings},
                    )
                    write_sidecar(sidecar_path(out), record)
                except BaseException:  # an output without its sidecar is not finished: it goes too
                    out.unlink(missing_ok=True)
                    raise
            except OSError as exc:
                raise self._unwritable(exc, outputs) from None
            command = self.command(request.recipe_name, item.overrides, str(image_path), str(mask_path),
                                   request.prompt, request.seed, str(out))
            probed = None
            if result.probes:
                probed = ProbeRun(f"{item.variant.slot}: {item.variant.label}", item.recipe, result.image, result.seed,
                                  request.prompt, request.inputs.mask_array, dict(result.probes),
                                  token_labels(self.pipe.tokenizer, request.prompt))
            outputs.append(VariantOutput(item.variant, result.image, out, sidecar_path(out), command, probed))
        report(1.0, "done")
