"""``attnctl inpaint``: single image + sidecar, reproduction from the sidecar, batch manifests, Python API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from attnctl.cli import main
from harmonpaint_recipe.files import sha256_of

TINY = ["model.pretrained=tiny", "sampler.steps=3"]


def test_single_run_writes_image_and_sidecar_then_reproduces_it(files, capsys):
    out = files / "out" / "result.png"
    rc = main(["inpaint", "--recipe", "harmonpaint", "--image", str(files / "img.png"), "--mask", str(files / "mask.png"),
               "--prompt", "a red cat", "--out", str(out), "--seed", "5", "--device", "cpu", *TINY])
    assert rc == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert Image.open(out).size == (64, 64)
    assert record["seed"] == 5 and record["prompt"] == "a red cat" and record["recipe_name"] == "harmonpaint"
    assert record["model"] == {"id": "tiny", "pipeline": "StableDiffusionInpaintPipeline", "device": "cpu", "dtype": "fp32"}
    assert record["recipe"]["sampler"]["steps"] == 3 and record["recipe"]["strategies"]["makvs"]["scale"] == 1.4
    assert record["recipe"]["strategies"]["phases"]["rules"]["sams"] == {"min": 0.6}  # resolved
    assert record["inputs"]["image"]["sha256"] == sha256_of(files / "img.png")
    assert record["inputs"]["mask"]["sha256"] == sha256_of(files / "mask.png")
    assert record["output"]["sha256"] == sha256_of(out)
    assert {"attnctl", "torch", "diffusers", "transformers", "python"} <= set(record["versions"])
    assert record["timings"]["inpaint_s"] > 0 and "load_s" in record["timings"]

    again = files / "again.png"
    assert main(["inpaint", "--from", str(out.with_suffix(".json")), "--out", str(again)]) == 0
    assert "identical to the image recorded" in capsys.readouterr().out
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))  # bit-identical on CPU
    assert json.loads(again.with_suffix(".json").read_text())["seed"] == 5


def test_manifest_batch_and_rerun_skips_written_items(files, capsys):
    (files / "items.jsonl").write_text(
        json.dumps({"image": "img.png", "mask": "mask.png", "prompt": "a dog", "seed": 1, "name": "first"}) + "\n"
        + "\n# comment lines are skipped\n"
        + json.dumps({"image": "img.png", "mask": "mask.png", "prompt": "a boat", "name": "second"}) + "\n"
    )
    argv = ["inpaint", "--recipe", "sdi", "--manifest", str(files / "items.jsonl"), "--out-dir", str(files / "res"),
            "--seed", "9", "model.pretrained=tiny", "sampler.steps=2"]
    assert main(argv) == 0
    first, second = json.loads((files / "res/first.json").read_text()), json.loads((files / "res/second.json").read_text())
    assert (first["seed"], first["prompt"], second["seed"], second["prompt"]) == (1, "a dog", 9, "a boat")
    assert first["inputs"]["image"]["path"] == str((files / "img.png").resolve())
    mtime = (files / "res/first.png").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipping 2 item(s) already written" in captured.err and "nothing to do" in captured.out
    assert (files / "res/first.png").stat().st_mtime_ns == mtime
    assert not list((files / "res").glob("*.tmp"))


def test_python_api_with_paths_pil_and_overrides(files, tiny_pipe):
    import harmonpaint_recipe as hp

    mask = Image.open(files / "mask.png")
    a = hp.inpaint(files / "img.png", mask, "a cat", recipe="sdi", pipe=tiny_pipe, seed=3, sampler__steps=2)
    b = hp.inpaint(str(files / "img.png"), mask, "a cat", recipe=hp.load_recipe("sdi"), pipe=tiny_pipe,
                   seed=3, overrides=["sampler.steps=2"])
    c = hp.inpaint(files / "img.png", mask, "a cat", recipe="sdi", pipe=tiny_pipe, seed=3,
                   overrides={"sampler.steps": 2}, sampler__guidance_scale=1.0)
    assert isinstance(a, Image.Image) and a.size == (64, 64)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_recipes_listing_and_show(capsys):
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert "harmonpaint-sdxl" in listing and "plain Stable Diffusion inpainting" in listing
    assert main(["recipe", "show", "harmonpaint-natural", "eta=0.5", "strategies.steer.enabled=false"]) == 0
    shown = capsys.readouterr().out
    assert "scale: 0.8" in shown and "min: 0.5" in shown and "${eta}" not in shown
    assert "  steer:\n    strategy: latent_guidance\n    enabled: false" in shown
