"""Stylizer, masks from polygons/RLE/PNG, and the manifest builder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from attnctl.errors import InputError
from harmonpaint_recipe.dataset.manifest import build_stylized_manifest
from harmonpaint_recipe.dataset.masks import bbox_mask, polygons_to_mask, rle_to_mask
from harmonpaint_recipe.dataset.stylize import lab_to_rgb, rgb_to_lab, stylize


def _rand(seed, h=24, w=32, lo=0, hi=256):
    return Image.fromarray(np.random.default_rng(seed).integers(lo, hi, (h, w, 3)).astype(np.uint8))


def test_lab_roundtrip():
    x = np.random.default_rng(0).uniform(0.05, 1, (100, 3))
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-9)


def test_stats_transfer_matches_style_moments_in_lab():
    content, style = _rand(1, lo=40, hi=200), _rand(2, 30, 20, lo=100, hi=256)
    out = stylize(content, style, mode="stats")
    assert out.size == content.size
    lab = lambda im: rgb_to_lab(np.asarray(im, dtype=np.float64) / 255).reshape(-1, 3)
    o, s = lab(out), lab(style)
    np.testing.assert_allclose(o.mean(0), s.mean(0), atol=0.02)  # uint8 rounding is the only error
    np.testing.assert_allclose(o.std(0), s.std(0), rtol=0.1)
    np.testing.assert_array_equal(np.asarray(stylize(content, style, strength=0.0)), np.asarray(content).clip(1))


def test_histogram_mode_preserves_content_ranks():
    content, style = _rand(3), _rand(4, lo=120, hi=200)
    out = np.asarray(stylize(content, style, mode="histogram"), dtype=np.float64)
    # luminance order of content pixels survives (monotone per-channel map in l-alpha-beta)
    l_in = rgb_to_lab(np.asarray(content, dtype=np.float64) / 255)[..., 0].ravel()
    l_out = rgb_to_lab(out / 255)[..., 0].ravel()
    corr = np.corrcoef(np.argsort(np.argsort(l_in)), np.argsort(np.argsort(l_out)))[0, 1]
    assert corr > 0.95
    assert 100 < out.mean() < 210  # moved into the style's range


def test_polygon_rle_and_bbox_masks():
    m = polygons_to_mask([[2, 1, 6, 1, 6, 4, 2, 4]], (10, 8))
    assert m.shape == (8, 10) and m.sum() == 5 * 4 and m[1:5, 2:7].all()
    # column-major RLE of a 3x2 image: 0,1 / 1,0 / 1,1 -> columns (0,1,1),(1,0,1)
    rle = rle_to_mask({"size": [3, 2], "counts": [1, 3, 1, 1]})
    np.testing.assert_array_equal(rle, [[0, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(bbox_mask(np.pad([[0, 1], [1, 0]], 2)).sum(), 4)
    with pytest.raises(InputError, match="compressed"):
        rle_to_mask({"size": [2, 2], "counts": "abc"})


def test_manifest_builder(tmp_path):
    content, styles = tmp_path / "content", tmp_path / "styles"
    content.mkdir(), styles.mkdir()
    _rand(5, 40, 60).save(content / "a.png")
    _rand(6, 40, 40).save(content / "b.png")
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 5:30] = 255
    Image.fromarray(mask).save(content / "b_mask.png")
    _rand(7).save(styles / "s1.png")
    ann = tmp_path / "ann.jsonl"
    ann.write_text(
        json.dumps({"image": "a.png", "caption": "a cat", "segmentation": [[20, 10, 40, 10, 40, 30, 20, 30]]}) + "\n"
        + json.dumps({"image": "b.png", "caption": "a dog", "id": "dog", "mask": "b_mask.png"}) + "\n"
    )
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    items = build_stylized_manifest(content, styles, ann, tmp_path / "out", size=20)
    rows = [json.loads(l) for l in items.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a_0", "dog"] and rows[1]["prompt"] == "a dog"
    img = Image.open(items.parent / rows[0]["image"])
    seg = np.asarray(Image.open(items.parent / rows[0]["mask"])) > 0
    box = np.asarray(Image.open(items.parent / rows[1]["bbox_mask"])) > 0
    assert img.size == (20, 20)
    # a.png is 60x40: center crop x 10..50 -> polygon x 20..40 becomes 10..30 of 40 -> 5..15 of 20
    assert seg[5:15, 5:15].all() and seg.sum() == 100
    assert box.sum() == (np.asarray(Image.open(items.parent / rows[1]["mask"])) > 0).sum()  # rectangle: bbox == seg
    assert all(p.read_bytes() == b for p, b in before.items())  # inputs untouched
    with pytest.raises(InputError, match="input folder"):
        build_stylized_manifest(content, styles, ann, content)
