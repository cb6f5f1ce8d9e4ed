"""Batch manifests for ``attnctl inpaint --manifest items.jsonl --out-dir DIR``.

One JSON object a line: ``{"image": ..., "mask": ..., "prompt": ..., "seed": 0, "name": ...}``
(``seed`` and ``name`` optional; ``name`` defaults to the image's file stem). Relative
paths are resolved against the manifest's folder. Blank lines and ``#`` lines are skipped.
"""

from __future__ import annotations

from pathlib import Path

from attnctl.errors import InputError
from harmonpaint_recipe.files import iter_jsonl_objects
from harmonpaint_recipe.jobs import Job

REQUIRED = ("image", "mask", "prompt")
OPTIONAL = ("seed", "name")


def read_manifest(path: str | Path, out_dir: str | Path, seed: int | None = None, suffix: str = ".png") -> list[Job]:
    """Jobs of a manifest, each writing ``out_dir/<name><suffix>``.

    Args:
        seed: seed of rows that have none (``None``: a random one, recorded in the sidecar).

    Raises:
        InputError: missing manifest, bad JSON, missing/unknown keys, duplicate names.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest file '{path}' does not exist; give a .jsonl file with image, mask, prompt per line")
    out_dir = Path(out_dir)
    jobs: list[Job] = []
    names: dict[str, int] = {}
    for lineno, where, row in iter_jsonl_objects(path, lambda n: f"{path}:{n}"):
        missing = [k for k in REQUIRED if row.get(k) is None or (k != "prompt" and not row[k])]  # "" is a prompt
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}; every row needs {', '.join(REQUIRED)}")
        unknown = sorted(set(row) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
        row_seed = row.get("seed", seed)
        if row_seed is not None and (not isinstance(row_seed, int) or isinstance(row_seed, bool)):
            raise InputError(f"{where}: seed must be an integer, got {row_seed!r}")
        image = path.parent / str(row["image"])
        mask = path.parent / str(row["mask"])
        name = str(row.get("name") or Path(str(row["image"])).stem)
        if name in names:
            raise InputError(f"{where}: output name '{name}' is also used on line {names[name]}; add a unique 'name'")
        names[name] = lineno
        jobs.append(Job(image=image, mask=mask, prompt=str(row["prompt"]), out=out_dir / f"{name}{suffix}", seed=row_seed))
    if not jobs:
        raise InputError(f"manifest '{path}' has no rows")
    return jobs
