"""What ``attnctl probe`` writes into its output folder: images, pictures, one JSON with every number."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

from attnctl.errors import InputError
from harmonpaint_recipe.files import atomic_save_image, atomic_write_json
from harmonpaint_recipe.probing.render import pictures
from harmonpaint_recipe.probing.run import ProbeRun

JSON_NAME = "probes.json"


def image_names(labels: Sequence[str]) -> list[str]:
    """``image.png`` for one run; ``A-<label>.png``, ``B-<label>.png`` for a comparison."""
    if len(labels) == 1:
        return ["image.png"]
    return [f"{chr(ord('A') + i)}-{re.sub(r'[^A-Za-z0-9._-]+', '-', label).strip('-')}.png"
            for i, label in enumerate(labels)]


def check_out_dir(out_dir: Path, labels: Sequence[str], inputs: Sequence[Path]) -> None:
    """Refuse an output folder where a file written would replace an input; create the folder."""
    targets = {(out_dir / name).resolve() for name in image_names(labels)}
    targets |= {(out_dir / f"{kind}.png").resolve() for kind in ("cross_maps", "self_pca", "curves")}
    targets.add((out_dir / JSON_NAME).resolve())
    for path in inputs:
        if Path(path).resolve() in targets:
            raise InputError(f"--out-dir {out_dir} would overwrite the input '{path}'; attnctl never overwrites "
                             "inputs - choose another --out-dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {out_dir} is a file; give a folder (it is created if missing)")
    out_dir.mkdir(parents=True, exist_ok=True)


def write_outputs(runs: Sequence[ProbeRun], out_dir: Path, meta: dict[str, Any]) -> list[Path]:
    """Each run's image, the pictures (side by side for a comparison) and ``probes.json``; the paths written."""
    written = []
    names = image_names([run.label for run in runs])
    for run, name in zip(runs, names):
        atomic_save_image(out_dir / name, run.image)
        written.append(out_dir / name)
    drawn = pictures(runs)
    for kind, picture in drawn.items():
        atomic_save_image(out_dir / f"{kind}.png", picture)
        written.append(out_dir / f"{kind}.png")
    record = {
        **meta,
        "runs": [{**run.record(), "image": name} for run, name in zip(runs, names)],
        "pictures": [f"{kind}.png" for kind in drawn],
    }
    atomic_write_json(out_dir / JSON_NAME, record)
    written.append(out_dir / JSON_NAME)
    return written
