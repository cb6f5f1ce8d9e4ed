"""The evaluation harness: values, resume after a crash, tables, grids, CMMD."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from harmonpaint_recipe.metrics import MetricOptions, build_metrics
from harmonpaint_recipe.metrics.cmmd import mmd_rbf
from harmonpaint_recipe.metrics.testing import save_tiny_clip
from harmonpaint_recipe.dataset.sample import build_sample
from harmonpaint_recipe.evaluation.items import load_items
from harmonpaint_recipe.evaluation.methods import Method
from harmonpaint_recipe.evaluation.runner import EvalConfig, Runner
from harmonpaint_recipe.evaluation.sharding import Shard


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    items = build_sample(root / "data", size=32, limit=3)
    clip = save_tiny_clip(root / "clip")
    return items, clip


class Fake:
    """Deterministic 'inpainting': masked pixels set to a gray level; counts calls."""

    def __init__(self, level, crash_after=None):
        self.level, self.crash_after, self.calls = level, crash_after, []

    def __call__(self, image, mask, prompt, *, seed, item_id):
        if self.crash_after is not None and len(self.calls) >= self.crash_after:
            raise KeyboardInterrupt
        self.calls.append(item_id)
        a = np.array(image)
        a[np.array(mask) > 0] = self.level
        return Image.fromarray(a)


class Counting:
    """Wraps a metric and counts score() calls."""

    def __init__(self, metric):
        self.metric, self.calls = metric, 0
        self.name, self.keys, self.per_item = metric.name, metric.keys, metric.per_item

    def __getattr__(self, name):
        return getattr(self.metric, name)

    def safe_score(self, sample):
        self.calls += 1
        return self.metric.safe_score(sample)


def _config(items, clip, out):
    opts = MetricOptions(clip_model=str(clip), cmmd_model=str(clip), local_files_only=True)
    methods = [Method("gray", recipe="gray"), Method("white", recipe="white")]
    return EvalConfig(load_items(items), methods, out, ["cs", "cmmd", "as", "ir", "preserve"], opts, title="T")


def _factory(fakes):
    return lambda method: fakes[method.name]


def test_values_tables_and_grid(data, tmp_path):
    items, clip = data
    cfg = _config(items, clip, tmp_path / "run")
    metrics = build_metrics(cfg.metric_names, cfg.metric_options)
    res = Runner(cfg, metrics=metrics, inpaint_factory=_factory({"gray": Fake(128), "white": Fake(255)}), shard=Shard()).run()
    rows = [json.loads(l) for l in res.per_item.read_text().splitlines()]
    assert [(r["method"], r["id"]) for r in rows] == [(m, i) for m in ("gray", "white") for i in ("chelsea", "coffee", "astronaut")]
    # preservation: only masked pixels changed -> MSE 0, PSNR at its cap
    assert all(r["mse"] == 0.0 and r["psnr"] == 100.0 for r in rows)
    # unavailable metrics are null with a reason, never numbers
    assert all(r["as"] is None and "--aesthetic-head" in r["unavailable_reason"]["as"] for r in rows)
    assert all(r["ir"] is None and "lpips" not in r for r in rows)  # LPIPS is opt-in
    # CS equals the metric on the saved output
    out = Image.open(tmp_path / "run" / rows[0]["output"])
    from harmonpaint_recipe.metrics.base import Sample
    assert rows[0]["cs"] == pytest.approx(metrics["cs"].safe_score(Sample(image=out, prompt="a cat")).values["cs"], abs=1e-5)
    # summary: mean and sample std of the per-item values; CMMD from stored embeddings
    summary = {s["method"]: s for s in res.summary}
    cs = [r["cs"] for r in rows if r["method"] == "gray"]
    assert summary["gray"]["cs_mean"] == pytest.approx(np.mean(cs))
    assert summary["gray"]["cs_std"] == pytest.approx(np.std(cs, ddof=1))
    gen = np.stack([np.load(tmp_path / "run/embeddings/gray" / f"{i}.npy") for i in ("chelsea", "coffee", "astronaut")])
    ref = metrics["cmmd"].embed([Image.open(it.image_path) for it in cfg.items])
    assert summary["gray"]["cmmd_mean"] == pytest.approx(mmd_rbf(ref, gen), rel=1e-6)
    with open(res.summary_csv) as f:
        csv_rows = list(csv.DictReader(f))
    assert float(csv_rows[0]["cs_mean"]) == pytest.approx(np.mean(cs)) and csv_rows[0]["as_mean"] == ""
    md = res.summary_md.read_text()
    assert "| Method | CS ↑ | IR ↑ | AS ↑ | CMMD ↓ | MSE ↓ | PSNR ↑ | n |" in md
    assert f"| gray | {np.mean(cs):.2f} ± {np.std(cs, ddof=1):.2f} |" in md and "n/a [" in md
    grid = Image.open(res.grids[0])
    assert grid.size == (4 * 128, 18 + 3 * 128)
    # cell (row 1, column 'white') is the white-filled output: its masked center is white
    assert grid.getpixel((3 * 128 + 64, 18 + 64)) == (255, 255, 255)


def test_killed_run_resumes_without_recomputing(data, tmp_path):
    items, clip = data
    cfg = _config(items, clip, tmp_path / "run")
    metrics = {k: Counting(m) for k, m in build_metrics(cfg.metric_names, cfg.metric_options).items()}
    crashing = {"gray": Fake(128), "white": Fake(255, crash_after=1)}
    with pytest.raises(KeyboardInterrupt):
        Runner(cfg, metrics=metrics, inpaint_factory=_factory(crashing), shard=Shard()).run()
    first_cs_calls = metrics["cs"].calls
    assert first_cs_calls == 4  # 3 gray items + 1 white item scored before the crash
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "run").rglob("*"))

    resumed = {"gray": Fake(128), "white": Fake(255)}
    res = Runner(cfg, metrics=metrics, inpaint_factory=_factory(resumed), shard=Shard()).run()
    assert resumed["gray"].calls == [] and resumed["white"].calls == ["coffee", "astronaut"]
    assert metrics["cs"].calls - first_cs_calls == 2  # only the two new outputs were scored

    clean = Runner(_config(items, clip, tmp_path / "clean"),
                   inpaint_factory=_factory({"gray": Fake(128), "white": Fake(255)}), shard=Shard()).run()
    assert res.per_item.read_text().replace(str(tmp_path / "run"), "") == clean.per_item.read_text().replace(str(tmp_path / "clean"), "")
    assert res.summary_csv.read_text() == clean.summary_csv.read_text()

    # a third run with everything cached generates and scores nothing
    before = metrics["cs"].calls
    idle = {"gray": Fake(0, crash_after=0), "white": Fake(0, crash_after=0)}
    Runner(cfg, metrics=metrics, inpaint_factory=_factory(idle), shard=Shard()).run()
    assert metrics["cs"].calls == before


def test_resume_with_other_settings_is_refused(data, tmp_path):
    from attnctl.errors import InputError

    items, clip = data
    cfg = _config(items, clip, tmp_path / "run")
    cfg.metric_names = ["preserve"]
    Runner(cfg, inpaint_factory=_factory({"gray": Fake(1), "white": Fake(2)}), shard=Shard()).run()
    cfg.methods = [Method("gray", recipe="gray", overrides=("strategies.sams.enabled=false",))]
    with pytest.raises(InputError, match="method 'gray'.*new --out"):
        Runner(cfg, inpaint_factory=_factory({"gray": Fake(1)}), shard=Shard()).run()


def test_sharded_ranks_merge_to_single_process_result(data, tmp_path):
    """Two ranks run one after the other in this process (a no-op barrier) into one folder."""
    items, clip = data
    fakes = {"gray": Fake(128), "white": Fake(255)}
    single = Runner(_config(items, clip, tmp_path / "single"), inpaint_factory=_factory(fakes), shard=Shard()).run()
    cfg = _config(items, clip, tmp_path / "multi")
    Runner(cfg, inpaint_factory=_factory(fakes), shard=Shard(rank=1, world=2)).run_shard()
    merged = Runner(cfg, inpaint_factory=_factory(fakes), shard=Shard(rank=0, world=2)).run()
    assert merged.per_item.read_text() == single.per_item.read_text()
    assert merged.summary_csv.read_text() == single.summary_csv.read_text()
    assert not math.isnan(merged.summary[0]["cmmd_mean"])
