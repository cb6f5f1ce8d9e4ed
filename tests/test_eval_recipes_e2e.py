"""End to end with the real recipe runner on the tiny random pipeline (noise output)."""

from __future__ import annotations

import json

import pytest

from attnctl.cli import main
from harmonpaint_recipe.dataset.sample import build_sample

pytestmark = pytest.mark.slow
TINY = ["model.pretrained=tiny", "sampler.steps=2"]


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return build_sample(tmp_path_factory.mktemp("e2e") / "data", size=64, limit=1)


def test_eval_recipes_end_to_end(items, tmp_path):
    out = tmp_path / "eval"
    argv = ["eval", "--recipes", "sdi,harmonpaint", "--data", str(items), "--out", str(out),
            "--metrics", "preserve", "--local-files-only", *TINY]
    assert main(argv) == 0
    rows = [json.loads(l) for l in (out / "per_item.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["sdi", "harmonpaint"]
    assert all(r["mse"] > 0 and r["psnr"] < 100 for r in rows)  # random weights change the background too
    assert json.loads((out / "outputs/harmonpaint/method.json").read_text())["overrides"] == TINY
    stamp = (out / "outputs/sdi/chelsea.png").stat().st_mtime_ns
    assert main(argv) == 0  # resumed: the output is reused, not regenerated
    assert (out / "outputs/sdi/chelsea.png").stat().st_mtime_ns == stamp


def test_ablate_end_to_end(items, tmp_path):
    out = tmp_path / "ablate"
    assert main(["ablate", "--recipe", "harmonpaint", "--data", str(items), "--out", str(out),
                 "--metrics", "preserve", "--local-files-only", *TINY]) == 0
    methods = [l.split("|")[1].strip() for l in (out / "summary.md").read_text().splitlines()[4:] if l.startswith("| ")]
    assert methods == ["none", "+sams", "+sams+steer", "full", "full-sams", "full-steer"]
    fp = json.loads((out / "outputs/+sams/method.json").read_text())
    assert fp["overrides"][-3:] == ["strategies.sams.enabled=true", "strategies.steer.enabled=false",
                                    "strategies.makvs.enabled=false"]
