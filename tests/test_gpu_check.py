"""``attnctl gpu-check`` in its smallest setting on the tiny architectures, its plan and
time budget, and the offline wheel installer's choices. Nothing here times anything."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from attnctl.cli import main
from harmonpaint_recipe.bench.gpu_check import pytest_counts
from harmonpaint_recipe.bench.gpu_plan import (
    DEFAULT_BUDGET_S, FINAL_RESERVE_S, Part, SuiteOptions, part_deadline, plan_parts,
)
from harmonpaint_recipe.bench.gpu_summary import MAX_FILE_BYTES, OUTPUT_FILES, compile_report
from harmonpaint_recipe.bench.parity import HALF_DTYPES, PARITY_RECIPES

pytest.importorskip("matplotlib")
pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    rc = main(["gpu-check", str(out), "--arch", "tiny", "--steps", "1", "--repeats", "1", "--warmup", "0",
               "--parity-steps", "3", "--skip", "compile,compile-hp,sd2", "--in-process",
               "--tests", str(ROOT / "tests" / "test_gpu.py")])
    return out, rc


def test_suite_succeeds_and_writes_few_small_files(suite_out):
    out, rc = suite_out
    assert rc == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.md", "suite.log", "gpu-tests.txt", "parity.json", "bench.json", "bench.md",
                            "bench.png"])
    assert set(files) <= set(OUTPUT_FILES) and len(OUTPUT_FILES) <= 8
    assert all(0 < (out / f).stat().st_size < MAX_FILE_BYTES for f in files)


def test_parity_compares_every_recipe_in_both_half_dtypes(suite_out):
    out, _ = suite_out
    parity = json.loads((out / "parity.json").read_text())
    assert parity["meta"]["config"]["steps"] == 3 and parity["meta"]["arch"]["name"] == "tiny"
    assert tuple(parity["recipes"]) == PARITY_RECIPES
    for recipe, rows in parity["recipes"].items():
        assert rows["fp32"]["finite"] is True
        for dtype in HALF_DTYPES:
            row = rows[dtype]
            assert row["finite"] is True and row["first_nonfinite_step"] is None
            assert row["max_abs_diff"] >= row["mean_abs_diff"] > 0  # half precision does round
    # the first of the 3 steps is a structure step, so the steer loss acts there
    assert parity["recipes"]["harmonpaint"]["fp16"]["mean_abs_diff"] != parity["recipes"]["sdi"]["fp16"]["mean_abs_diff"]


def test_bench_holds_the_sd15_and_sdxl_runs(suite_out):
    out, _ = suite_out
    bench = json.loads((out / "bench.json").read_text())
    assert list(bench) == ["sd15", "sdxl"]
    assert tuple(bench["sd15"]["variants"]) == ("stock", "idle", "sams+makvs", "harmonpaint", "naive")
    assert bench["sdxl"]["meta"]["arch"]["name"] == "tiny-sdxl" and bench["sdxl"]["meta"]["config"]["recipe"] == "harmonpaint-sdxl"
    assert tuple(bench["sdxl"]["variants"]) == ("stock", "harmonpaint")
    for run in bench.values():
        assert run["meta"]["rounds"] == {"warmup": 0, "timed": 1}
        for v in run["variants"].values():
            assert v["warmup_seconds"] == [] and len(v["seconds"]) == 1 and v["finite_output"] is True
    md = (out / "bench.md").read_text()
    assert "## `sd15`" in md and "## `sdxl`" in md
    with Image.open(out / "bench.png") as im:
        assert im.format == "PNG"


def test_summary_reports_every_part_tests_and_parity(suite_out):
    out, _ = suite_out
    summary = (out / "summary.md").read_text()
    for part in ("tests", "parity", "sd15", "sdxl"):
        assert f"| {part} | " in summary and "| ok |" in summary.split(f"| {part} | ", 1)[1].split("\n", 1)[0]
    assert "## Half-precision parity" in summary and "| harmonpaint | bf16 | yes |" in summary
    assert "6 skipped" in summary or "passed" in summary
    tests_log = (out / "gpu-tests.txt").read_text()
    assert tests_log.startswith("$ python -m pytest") and pytest_counts(tests_log)
    assert "== sd15: ok" in (out / "suite.log").read_text()


def test_compile_report_derives_compile_time_and_eager_ratio(suite_out):
    out, _ = suite_out
    eager = json.loads((out / "bench.json").read_text())["sd15"]
    compiled = copy.deepcopy(eager)
    median = compiled["variants"]["stock"]["sec_per_image"]["median"]
    compiled["variants"]["stock"]["warmup_seconds"] = [median + 2.5, median + 0.5]  # compiled, then recompiled
    report = compile_report({"compile": compiled}, eager)
    rows = {(r["part"], r["variant"]): r for r in report["rows"]}
    stock = rows["compile", "stock"]
    assert report["eager_comparable"] is True and stock["vs_eager_stock"] == pytest.approx(1.0)
    assert stock["compile_s"] == pytest.approx(3.0, abs=1e-3)
    assert rows["compile", "idle"]["compile_s"] is None  # no warm-up run: nothing to tell
    other = copy.deepcopy(eager)
    other["meta"]["config"]["steps"] += 1
    assert compile_report({"compile": compiled}, other)["rows"][0]["vs_eager_stock"] is None


def test_default_plan_is_the_full_size_gpu_run_and_fits_the_budget(tmp_path):
    parts = {p.name: p for p in plan_parts(SuiteOptions(out=tmp_path))}
    assert list(parts) == ["tests", "parity", "sd15", "sdxl", "compile", "compile-hp", "sd2"]
    sd15 = parts["sd15"].settings
    assert (sd15["arch"], sd15["steps"], sd15["repeats"], sd15["warmup"], len(sd15["variants"])) == ("sd15-inpaint", 50, 5, 1, 5)
    assert parts["parity"].settings["steps"] == 10 and parts["sdxl"].settings["arch"] == "sdxl-inpaint"
    assert parts["sd2"].settings["size"] == 768 and parts["sd2"].optional and parts["compile-hp"].optional
    assert parts["compile"].settings["compile"] and "harmonpaint" in parts["compile-hp"].settings["variants"]
    required = sum(p.estimate_s for p in parts.values() if not p.optional)
    assert required <= DEFAULT_BUDGET_S - FINAL_RESERVE_S


def test_skip_and_only_pick_parts(tmp_path):
    names = [p.name for p in plan_parts(SuiteOptions(out=tmp_path, arch="tiny", only=("parity", "sd2"), skip=("sd2",)))]
    assert names == ["parity"]


def test_later_required_parts_keep_their_minimum_in_reserve():
    later = [Part("a", "", "bench", {}, 100, 40), Part("b", "", "bench", {}, 100, 30, optional=True)]
    assert part_deadline(500.0, later) == 460.0
    assert part_deadline(500.0, []) == 500.0


def test_parts_that_cannot_fit_are_skipped_and_said_so(tmp_path):
    out = tmp_path / "o"
    assert main(["gpu-check", str(out), "--arch", "tiny", "--budget", "15", "--in-process"]) == 0
    summary = (out / "summary.md").read_text()
    assert summary.count("| skipped |") == 7 and "not enough time" in summary
    assert "--only tests,parity,sd15,sdxl,compile,compile-hp,sd2" in summary
    assert sorted(p.name for p in out.iterdir()) == ["suite.log", "summary.md"]


def test_bad_options_fail_with_a_message(tmp_path, capsys):
    assert main(["gpu-check", str(tmp_path), "--skip", "parit"]) == 2
    assert "--skip: unknown part 'parit' (did you mean 'parity'?)" in capsys.readouterr().err
    assert main(["gpu-check", str(tmp_path), "--budget", "5"]) == 2
    assert "--budget must be more than 10 seconds" in capsys.readouterr().err
    assert main(["gpu-check", str(tmp_path), "--size", "100"]) == 2
    assert "--size must be a positive multiple of 8" in capsys.readouterr().err


def test_pytest_counts_reads_the_closing_line():
    assert pytest_counts("x\n3 passed, 1 failed, 2 skipped in 1.2s\n") == {"passed": 3, "failed": 1, "skipped": 2}
    assert pytest_counts("1 error in 0.1s") == {"errors": 1}
    assert pytest_counts("no summary") == {}


def _installer():
    spec = importlib.util.spec_from_file_location("install_wheels", ROOT / "scripts" / "install_wheels.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_installer_adds_only_what_the_machine_lacks_or_has_too_old():
    iw = _installer()
    D = iw.Dist
    machine = {"torch": D("torch", "2.13.0"), "filelock": D("filelock", "4.3.1"),
               "huggingface-hub": D("huggingface-hub", "1.0.0")}
    wheels = {d.name: d for d in (
        D("attnctl", "0.1.0", ["torch>=2.1", "diffusers>=0.30", 'pytest>=8; extra == "test"'], Path("a.whl")),
        D("diffusers", "0.42.1", ["filelock", "huggingface-hub<3.0,>=1.32.0", "requests"], Path("d.whl")),
        D("requests", "2.34.2", [], Path("r.whl")),
        D("filelock", "4.3.1", [], Path("f.whl")),
        D("huggingface-hub", "2.4.0", [], Path("h.whl")),
    )}
    chosen = iw.plan(wheels, machine)
    assert sorted(chosen) == ["attnctl", "diffusers", "huggingface-hub", "requests"]  # filelock: the machine's fits
    assert iw.unsatisfied({**machine, **chosen}) == []
    problems = iw.unsatisfied({**machine, "attnctl": wheels["attnctl"]})
    assert problems == [("attnctl 0.1.0", "diffusers>=0.30", None)]
    assert iw.normalize("Charset_Normalizer") == "charset-normalizer"
