"""``attnctl bench`` runs end to end on the tiny model and writes well-formed reports.

Benchmarks are never timed assertions: this only checks the command and its outputs.
"""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from PIL import Image

from attnctl.cli import main

pytest.importorskip("matplotlib")
pytest.importorskip("psutil")

VARIANTS = ("stock", "idle", "sams+makvs", "harmonpaint", "naive")


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--arch", "tiny", "--steps", "2", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    return out


def test_json_has_every_variant_with_ratios_to_stock(bench_out):
    result = json.loads((bench_out / "bench.json").read_text())
    assert set(result) == {"meta", "variants", "targets"}
    assert tuple(result["variants"]) == VARIANTS
    meta = result["meta"]
    assert meta["arch"]["name"] == "tiny"
    assert meta["config"]["steps"] == 2 and meta["config"]["repeats"] == 1 and meta["config"]["warmup"] == 0
    assert meta["torch"] == torch.__version__ and meta["diffusers"] == diffusers.__version__
    assert meta["device"].startswith("CPU") if meta["config"]["device"] == "cpu" else meta["device"]
    for name, v in result["variants"].items():
        assert len(v["seconds"]) == 1 and v["seconds"][0] > 0
        t = v["sec_per_image"]
        assert t["min"] <= t["median"] <= t["max"]
        assert v["it_per_s"] == pytest.approx(2 / t["median"])
        assert v["time_ratio"] == pytest.approx(t["median"] / result["variants"]["stock"]["sec_per_image"]["median"])
        assert v["peak_memory"]["median_bytes"] >= 0
        assert v["finite_output"] is True
    assert result["variants"]["stock"]["time_ratio"] == 1.0


def test_markdown_table_has_a_row_per_variant(bench_out):
    text = (bench_out / "bench.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| variant | s/image")
    names = [r.split("|")[1].strip() for r in rows[1:]]
    assert tuple(names) == VARIANTS
    stock = rows[1].split("|")
    assert stock[5].strip() == "1.000"  # time vs stock


def test_chart_is_a_png(bench_out):
    with Image.open(bench_out / "bench.png") as im:
        assert im.format == "PNG"
        assert im.size[0] > 200 and im.size[1] > 100


def test_bad_options_fail_with_a_message(tmp_path, capsys):
    assert main(["bench", "--arch", "tiny", "--variants", "stock,fast", "--out", str(tmp_path)]) == 2
    assert "--variants: unknown variant 'fast'" in capsys.readouterr().err
    assert main(["bench", "--arch", "tiny", "--size", "60", "--out", str(tmp_path)]) == 2
    assert "--size must be a positive multiple of 8" in capsys.readouterr().err


def test_naive_reference_makes_the_same_image_as_the_library(tiny_pipe):
    """The benchmark compares like with like: naive and harmonpaint agree, idle equals stock."""
    from harmonpaint_recipe.bench.harness import make_inputs
    from harmonpaint_recipe.bench.variants import TRANSFORMER_ONLY, VARIANTS, BenchInputs

    image, mask_image, mask = make_inputs(64, 0)

    def call_kwargs():
        return dict(prompt="a red fox in the snow", image=image, mask_image=mask_image, height=64, width=64,
                    num_inference_steps=6, guidance_scale=7.5, strength=1.0,
                    generator=torch.Generator().manual_seed(0), output_type="np")

    inputs = BenchInputs(pipe=tiny_pipe, call_kwargs=call_kwargs, mask=mask, prompt="a red fox in the snow")
    images = {}
    for name, factory in VARIANTS.items():
        if name in TRANSFORMER_ONLY:
            continue
        variant = factory()
        variant.setup(inputs)
        try:
            images[name] = variant()
        finally:
            variant.teardown()
    assert (images["idle"] == images["stock"]).all()
    assert abs(images["naive"] - images["harmonpaint"]).max() <= 1e-4
    assert abs(images["harmonpaint"] - images["stock"]).max() > 1e-3  # the recipe really acts


def test_time_limit_cuts_warm_up_and_timed_rounds_but_keeps_one_of_each():
    """With the limit already past: one warm-up round (no second), one timed round (no more)."""
    from harmonpaint_recipe.bench.harness import BenchConfig, run_benchmark

    lines: list[str] = []
    cfg = BenchConfig(arch="tiny", steps=1, repeats=3, warmup=2, variants=["stock"], stop_after=0.0)
    result = run_benchmark(cfg, log=lines.append)
    assert result["meta"]["rounds"] == {"warmup": 1, "timed": 1}
    stock = result["variants"]["stock"]
    assert len(stock["warmup_seconds"]) == 1 and len(stock["seconds"]) == 1
    assert any(line.startswith("skipping warm-up rounds 2-2") for line in lines)


def test_transformer_architectures_run_their_variants_and_refuse_the_others(tmp_path, capsys):
    """tiny-flux-fill: stock, idle, sams+makvs and harmonpaint+steer side by side; UNet-only variants refused."""
    from harmonpaint_recipe.bench.harness import BenchConfig, run_benchmark

    result = run_benchmark(BenchConfig(arch="tiny-flux-fill", steps=2, repeats=1, warmup=0), log=lambda line: None)
    assert list(result["variants"]) == ["stock", "idle", "sams+makvs", "harmonpaint+steer"]
    assert result["meta"]["arch"]["transformer_parameters"] > 0
    assert all(v["finite_output"] for v in result["variants"].values())
    assert main(["bench", "--arch", "tiny-sd3", "--variants", "stock,naive", "--out", str(tmp_path)]) == 2
    assert "naive run on UNet architectures only" in capsys.readouterr().err
    assert main(["bench", "--arch", "tiny", "--variants", "harmonpaint+steer", "--out", str(tmp_path)]) == 2
    assert "run on transformer architectures only" in capsys.readouterr().err


def test_the_report_names_a_transformers_sampling_as_it_is():
    from harmonpaint_recipe.bench.report import markdown_table

    meta = {"config": {"device": "cpu", "size": 64, "steps": 2, "guidance_scale": 30.0, "dtype": "float32",
                       "repeats": 1, "warmup": 0, "compile": False},
            "device": "CPU", "torch": "t", "diffusers": "d", "date": "now"}
    row = {"sec_per_image": {"median": 1.0, "min": 1.0, "max": 1.0}, "it_per_s": 2.0, "time_ratio": 1.0,
           "time_ratio_min": 1.0, "peak_memory": {"median_bytes": 1.0}, "memory_ratio": 1.0, "hwm_memory_ratio": None}
    flux = markdown_table({"meta": {**meta, "arch": {"name": "tiny-flux-fill", "transformer_parameters": 1}},
                           "variants": {"stock": row}, "targets": []})
    unet = markdown_table({"meta": {**meta, "arch": {"name": "tiny", "unet_parameters": 1}},
                           "variants": {"stock": row}, "targets": []})
    assert "2 flow-matching steps, guidance 30.0" in flux and "2 DDIM steps, CFG 30.0" in unet
