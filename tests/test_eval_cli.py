"""`attnctl eval` / `attnctl ablate` from the command line, and accelerate sharding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from attnctl.cli import main
from attnctl.errors import ConfigError
from harmonpaint_recipe.metrics.testing import save_tiny_clip
from harmonpaint_recipe.dataset.sample import build_sample
from harmonpaint_recipe.evaluation.ablation import ablation_components, ablation_methods, ablation_variants


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    items = build_sample(root / "data", size=32)
    rows = [json.loads(l) for l in items.read_text().splitlines()]
    for name, level in (("gray", 128), ("black", 0)):
        (root / name).mkdir()
        for r in rows:
            a = np.array(Image.open(items.parent / r["image"]))
            a[np.array(Image.open(items.parent / r["mask"])) > 0] = level
            Image.fromarray(a).save(root / name / f"{r['id']}.png")
    clip = save_tiny_clip(root / "clip")
    return root, items, clip


def _argv(root, items, clip, out):
    return ["eval", "--data", str(items), "--out", str(out), "--external", f"gray={root / 'gray'}",
            "--external", f"black={root / 'black'}", "--metrics", "cs,cmmd,preserve",
            "--clip-model", str(clip), "--cmmd-model", str(clip), "--local-files-only", "--device", "cpu"]


def test_eval_cli_external_methods(setup, capsys):
    root, items, clip = setup
    out = root / "out-cli"
    assert main(_argv(root, items, clip, out)) == 0
    printed = capsys.readouterr().out
    assert "| gray |" in printed and "| black |" in printed
    rows = [json.loads(l) for l in (out / "per_item.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["mse"] == 0.0 for r in rows)
    assert all("lpips" not in r for r in rows) and "LPIPS" not in printed  # opt-in (--lpips)
    assert (out / "grids" / "grid_000.png").is_file()
    before = (out / "per_item.jsonl").read_bytes()
    assert main(_argv(root, items, clip, out)) == 0  # resume: nothing changes
    assert (out / "per_item.jsonl").read_bytes() == before


def test_eval_cli_bad_input_names_the_fix(setup, capsys):
    root, items, clip = setup
    assert main(["eval", "--data", str(root / "missing.jsonl"), "--out", str(root / "x"), "--recipes", "sdi"]) == 2
    assert "dataset sample" in capsys.readouterr().err
    assert main(["eval", "--data", str(items), "--out", str(root / "x"), "--metrics", "cs,fid", "--recipes", "sdi"]) == 2
    assert "unknown metric 'fid'" in capsys.readouterr().err
    assert main(["eval", "--data", str(items), "--out", str(root / "x"), "--recipes", "sdi", "steps"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


HARMON = {
    "sams": {"strategy": "region_mask", "enabled": True},
    "steer": {"strategy": "latent_guidance", "enabled": True},
    "makvs": {"strategy": "kv_bank", "enabled": True},
    "phases": {"strategy": "timestep_gate", "enabled": True},
}


def test_ablation_variants_skip_gates():
    comps = ablation_components(HARMON)
    assert comps == ["sams", "steer", "makvs"]
    variants = ablation_variants(comps)
    assert [(n, sorted(e)) for n, e in variants] == [
        ("none", []), ("+sams", ["sams"]), ("+sams+steer", ["sams", "steer"]), ("full", ["makvs", "sams", "steer"]),
        ("full-sams", ["makvs", "steer"]), ("full-steer", ["makvs", "sams"]),  # full-makvs == +sams+steer
    ]
    with pytest.raises(ConfigError):
        ablation_variants(ablation_components({"phases": HARMON["phases"]}))


def test_ablation_methods_set_every_switch():
    calls = []

    def load(name, overrides):
        calls.append((name, overrides))
        return OmegaConf.create({"strategies": HARMON})

    methods = ablation_methods("harmonpaint", ["sampler.num_inference_steps=3"], load_recipe=load)
    assert calls == [("harmonpaint", ["sampler.num_inference_steps=3"])]
    plus_sams = next(m for m in methods if m.name == "+sams")
    assert plus_sams.overrides == (
        "sampler.num_inference_steps=3", "strategies.sams.enabled=true",
        "strategies.steer.enabled=false", "strategies.makvs.enabled=false",
    )
    assert not any("phases" in o for m in methods for o in m.overrides)


@pytest.mark.slow
def test_accelerate_two_processes_equal_single(setup):
    """`accelerate launch --multi_gpu --num_processes 2 -m attnctl eval` (torchrun, gloo on CPU) merges to the single-process result."""
    root, items, clip = setup
    single, multi = root / "single", root / "multi"
    assert main(_argv(root, items, clip, single)) == 0
    launcher = shutil.which("accelerate")
    if launcher is None:
        pytest.skip("accelerate's launcher is not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "attnctl", *_argv(root, items, clip, multi)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval [1/2] gray" in proc.stderr and "eval [0/2] gray" in proc.stderr  # both ranks worked
    # same rows, same order, same nulls and reasons; numbers equal up to float32 rounding
    # (the launched processes run single-threaded, so BLAS reductions may sum in another order)
    a = [json.loads(l) for l in (multi / "per_item.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (single / "per_item.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 8
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == (pytest.approx(rb[k], rel=1e-5, abs=1e-6) if isinstance(rb[k], float) else rb[k])
    ca = (multi / "summary.csv").read_text().splitlines()
    cb = (single / "summary.csv").read_text().splitlines()
    assert ca[0] == cb[0]
    for la, lb in zip(ca[1:], cb[1:]):
        fa, fb = la.split(","), lb.split(",")
        assert fa[0] == fb[0] and [x == "" for x in fa] == [x == "" for x in fb]  # same empty (n/a) cells
        numbers = [(float(x), float(y)) for x, y in zip(fa[1:], fb[1:]) if x]
        assert [x for x, _ in numbers] == pytest.approx([y for _, y in numbers], rel=1e-5, abs=1e-6)
