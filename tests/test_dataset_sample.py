"""The offline sample built from scikit-image's bundled images, through the CLI."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from attnctl.cli import main


def test_dataset_sample_cli(tmp_path, capsys):
    out = tmp_path / "sample"
    assert main(["dataset", "sample", "--out", str(out), "--size", "48"]) == 0
    rows = [json.loads(l) for l in (out / "items.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["chelsea", "coffee", "astronaut", "rocket"]
    assert rows[0]["prompt"] == "a cat"
    for r in rows:
        img = Image.open(out / r["image"])
        seg = np.asarray(Image.open(out / r["mask"])) > 0
        box = np.asarray(Image.open(out / r["bbox_mask"])) > 0
        assert img.size == (48, 48) and img.mode == "RGB"
        assert 0 < seg.sum() < seg.size and (box | seg).sum() == box.sum()  # box covers the segment
        ys, xs = np.nonzero(box)
        assert box.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1)  # and is a filled rectangle


def test_dataset_stylize_cli_reports_bad_input(tmp_path, capsys):
    code = main(["dataset", "stylize", "--content", str(tmp_path / "nope"), "--styles", str(tmp_path),
                 "--annotations", str(tmp_path / "a.json"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--content" in capsys.readouterr().err
