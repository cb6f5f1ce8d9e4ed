"""The testbed table's derived rows: the matched-noise control and paste-back from stored outputs."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from harmonpaint_recipe.paste_back import paste_back
from harmonpaint_recipe.testbed.derived import matched_sigma, write_matched_noise, write_paste_back


def test_matched_sigma_recovers_the_noise_a_method_adds():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    base = np.stack([60 + 2 * x, 80 + y, 200 - x - y], axis=-1).astype(np.float64)  # smooth: almost no detail
    mask = np.zeros((64, 64), bool)
    mask[16:48, 12:44] = True
    for sigma in (4.0, 12.0, 30.0):
        treated = base + rng.normal(0, sigma, base.shape) * mask[..., None]
        assert abs(matched_sigma(base, treated, mask) - sigma) < 0.08 * sigma
    assert matched_sigma(base, base, mask) == 0.0
    noisy = base + rng.normal(0, 10, base.shape) * mask[..., None]
    assert matched_sigma(noisy, base, mask) == 0.0  # less detail than the reference: nothing to match


def _store(tmp_path):
    rng = np.random.RandomState(1)
    data, outputs = tmp_path / "data", tmp_path / "outputs"
    for folder in (data / "images", data / "masks", outputs / "none", outputs / "full"):
        folder.mkdir(parents=True)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    records = []
    for i in range(2):
        rid = f"eval-{i:04d}"
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(data / "images" / f"{rid}.png")
        Image.fromarray(mask).save(data / "masks" / f"{rid}.png")
        for m in ("none", "full"):
            Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(outputs / m / f"{rid}.png")
        records.append({"id": rid, "image": f"images/{rid}.png", "mask": f"masks/{rid}.png"})
    return data, outputs, records


def test_derived_rows_are_written_from_stored_outputs(tmp_path):
    data, outputs, records = _store(tmp_path)
    write_paste_back(outputs, "full", tmp_path / "paste", records, data, blur=2.0)
    rec = records[0]
    expected = paste_back(Image.open(outputs / "full" / f"{rec['id']}.png"), Image.open(data / rec["image"]).convert("RGB"),
                          np.asarray(Image.open(data / rec["mask"])) / 255.0, 2.0)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "paste" / f"{rec['id']}.png")), np.asarray(expected))
    sigmas = write_matched_noise(outputs, "none", "full", tmp_path / "noise", records, data, seed=0)
    again = write_matched_noise(outputs, "none", "full", tmp_path / "noise2", records, data, seed=0)
    assert sigmas == again and len(sigmas) == 2
    a, b = (np.asarray(Image.open(tmp_path / d / f"{rec['id']}.png")) for d in ("noise", "noise2"))
    assert np.array_equal(a, b)  # seeded per item: the control is reproducible
    base = np.asarray(Image.open(outputs / "none" / f"{rec['id']}.png"))
    outside = np.asarray(Image.open(data / rec["mask"])) == 0
    assert np.array_equal(a[outside], base[outside])  # noise only inside the mask
    json.dumps(sigmas)
