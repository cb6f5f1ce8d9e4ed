"""``attnctl testbed removal``: the object-removal evaluation runs end to end and its controls land
where they must (the input keeps its object, the ground-truth background has none)."""

from __future__ import annotations

import json

import pytest

from harmonpaint_recipe.testbed.removal import RemovalSettings, run_removal_eval

pytestmark = pytest.mark.slow


def test_removal_eval_writes_its_table_and_the_controls_hold(tmp_path):
    path = run_removal_eval(RemovalSettings(out=tmp_path, items=3, steps=2, bootstrap=100), log=lambda *_: None)
    text = path.read_text(encoding="utf-8")
    assert "Attentive Eraser" in text and "control: the input" in text
    result = json.loads((tmp_path / "removal.json").read_text(encoding="utf-8"))
    methods = result["methods"]
    assert methods["input"]["removed"]["mean"] == 0.0  # the object is still there
    assert methods["truth-background"]["removed"]["mean"] == 1.0 and methods["truth-background"]["bg_mae"]["mean"] == 0.0
    assert methods["noise"]["harmony"]["mean"] > 0.9  # noise may look like "no object"; harmony does not pass it
    assert set(result["per_item"]["attentive-eraser"]) == {"removed", "harmony", "bg_mae"}
    assert (tmp_path / "removal.png").is_file()


def test_bad_settings_are_named(tmp_path):
    from attnctl.errors import InputError

    with pytest.raises(InputError, match="--items"):
        run_removal_eval(RemovalSettings(out=tmp_path, items=1))
    with pytest.raises(InputError, match="unknown method"):
        run_removal_eval(RemovalSettings(out=tmp_path, methods=("nope",)))
