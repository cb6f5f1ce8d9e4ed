"""Layout of an evaluation output folder; every file is written atomically.

::

    outputs/<method>/<id>.png          generated image (reused on resume)
    outputs/<method>/method.json       the method's fingerprint
    records/<method>/<id>.json         per-item metric values (+ unavailable reasons)
    embeddings/<method>/<id>.npy       CMMD embedding of the generated image
    embeddings/_reference/<key>.npy    CMMD embedding of a reference image
    metrics.json                       metric model settings (must match on resume)
    per_item.jsonl, summary.csv, summary.md, grids/grid_NNN.png   (rebuilt at the end)
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from attnctl.errors import InputError
from harmonpaint_recipe.files import atomic_save_image, atomic_write_bytes, atomic_write_json

REFERENCE = "_reference"


class Store:
    """Paths and atomic reads/writes under one ``--out`` folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def output(self, method: str, item_id: str) -> Path:
        return self.root / "outputs" / method / f"{item_id}.png"

    def record(self, method: str, item_id: str) -> Path:
        return self.root / "records" / method / f"{item_id}.json"

    def embedding(self, method: str, key: str) -> Path:
        return self.root / "embeddings" / method / f"{key}.npy"

    def read_json(self, path: Path) -> dict | None:
        """The JSON at ``path``, or ``None`` if it does not exist."""
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def write_json(self, path: Path, obj: dict) -> None:
        atomic_write_json(path, obj)

    def save_image(self, path: Path, image: Image.Image) -> None:
        atomic_save_image(path, image)

    def save_array(self, path: Path, array: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(array), allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())

    def load_array(self, path: Path) -> np.ndarray | None:
        return np.load(path, allow_pickle=False) if path.is_file() else None

    def check_settings(self, path: Path, settings: dict, what: str) -> None:
        """Write ``settings`` the first time; on resume they must be equal."""
        old = self.read_json(path)
        if old is None:
            self.write_json(path, settings)
        elif old != settings:
            raise InputError(
                f"--out '{self.root}' holds results of {what} made with other settings "
                f"({json.dumps(old, sort_keys=True)} != {json.dumps(settings, sort_keys=True)}); "
                "use a new --out folder or delete that one to start over"
            )
