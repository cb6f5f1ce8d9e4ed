"""What ``attnctl inpaint`` does: one image, a manifest of images, or a reproduction.

Each output image gets a sidecar JSON next to it (``sidecar.py`` owns the record,
``files.py`` writes atomically). Inputs are never overwritten; the output folder is created.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from attnctl.errors import InputError
from harmonpaint_recipe.devices import configure_threads
from harmonpaint_recipe.files import atomic_save_image, sha256_of
from harmonpaint_recipe.inputs import PreparedInputs, prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.model import load_pipeline
from harmonpaint_recipe.runner import Runner
from harmonpaint_recipe.sidecar import sidecar_path, sidecar_record, write_sidecar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class Job:
    """One image to make."""

    image: Path
    mask: Path
    prompt: str
    out: Path
    seed: int | None = None
    notes: list[str] = field(default_factory=list)


def check_output(out: Path, inputs: Sequence[Path]) -> Path:
    """Refuse outputs that would overwrite an input; create the output folder."""
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"output '{out}' must end in one of {', '.join(IMAGE_SUFFIXES)} (e.g. out.png)")
    targets = {out.resolve(), sidecar_path(out).resolve()}
    for path in inputs:
        if Path(path).resolve() in targets:
            which = "output" if Path(path).resolve() == out.resolve() else f"output's sidecar '{sidecar_path(out)}'"
            raise InputError(
                f"the {which} would overwrite the input '{path}'; attnctl never overwrites inputs - "
                "choose another --out"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


class JobRunner:
    """Loads the recipe's pipeline once and makes images for jobs."""

    def __init__(self, recipe: DictConfig, recipe_name: str, overrides: Sequence[str], resize_mask: bool = False,
                 threads: int | str | None = None):
        self.recipe = recipe
        self.threads = threads
        self.recipe_name = recipe_name
        self.overrides = list(overrides)
        self.resize_mask = resize_mask
        self._pipe = None
        self._runner: Runner | None = None
        self.load_s = 0.0

    def prepare(self, job: Job) -> PreparedInputs:
        """Check a job's inputs and output (no model work)."""
        check_output(job.out, [job.image, job.mask])
        return prepare_inputs(job.image, job.mask, resize_mask=self.resize_mask)

    def runner(self) -> Runner:
        if self._runner is None:
            configure_threads(self.threads, str(self.recipe.model.pretrained))
            start = time.perf_counter()
            self._pipe = load_pipeline(self.recipe)
            self.load_s = round(time.perf_counter() - start, 3)
            self._runner = Runner(self._pipe, self.recipe)
        return self._runner

    def set_progress_bar(self, **kwargs: Any) -> None:
        self.runner().pipe.set_progress_bar_config(**kwargs)

    def run(self, job: Job, inputs: PreparedInputs | None = None) -> dict[str, Any]:
        """Make ``job``'s image, write it and its sidecar; return the sidecar record."""
        inputs = inputs or self.prepare(job)
        runner = self.runner()
        result = runner(inputs, job.prompt, job.seed)
        atomic_save_image(job.out, result.image)
        record = sidecar_record(
            out=job.out, image=job.image, mask=job.mask, prompt=job.prompt, seed=result.seed, recipe=self.recipe,
            recipe_name=self.recipe_name, overrides=self.overrides, pipe=runner.pipe, notes=inputs.notes,
            resize_mask=self.resize_mask, timings={"load_s": self.load_s, **result.timings},
        )
        write_sidecar(sidecar_path(job.out), record)
        return record

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()


def reproduction(sidecar: dict[str, Any], sidecar_file: Path, out: Path | None, overrides: Sequence[str]):
    """(recipe, job, resize_mask) that remake the image a sidecar describes.

    Warns (``InputWarning``) when an input file changed since the sidecar was written.
    """
    import warnings

    from harmonpaint_recipe.inputs import InputWarning

    recipe = load_recipe(sidecar["recipe"], list(overrides))
    ins = sidecar["inputs"]
    for key in ("image", "mask"):
        path = Path(ins[key]["path"])
        if path.is_file() and sha256_of(path) != ins[key].get("sha256"):
            warnings.warn(f"{key} '{path}' changed since {sidecar_file} was written; the output will differ",
                          InputWarning, stacklevel=2)
    if out is None:
        original = Path(sidecar.get("output", {}).get("path") or sidecar_file.with_suffix(".png"))
        out = original.with_name(f"{original.stem}.repro{original.suffix}")
    job = Job(image=Path(ins["image"]["path"]), mask=Path(ins["mask"]["path"]), prompt=sidecar["prompt"],
              out=out, seed=int(sidecar["seed"]))
    return recipe, job, bool(ins.get("resize_mask", False))
