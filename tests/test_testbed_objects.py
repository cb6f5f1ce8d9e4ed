"""``attnctl testbed objects``: the object-prompt comparison runs end to end and its controls land
where they must (the judges are the trained ones shipped with the testbed)."""

from __future__ import annotations

import json

from harmonpaint_recipe.testbed.objects import ObjectsSettings, run_objects_eval


def test_objects_eval_writes_its_table_and_the_controls_hold(tmp_path):
    settings = ObjectsSettings(out=tmp_path, items=3, steps=2, bootstrap=100, methods=("sdi", "hd-painter"))
    path = run_objects_eval(settings, log=lambda *_: None)
    text = path.read_text(encoding="utf-8")
    assert "| SDI |" in text and "HD-Painter" in text and (tmp_path / "objects.png").exists()
    means = {name: {k: v["mean"] for k, v in m.items()}
             for name, m in json.loads((tmp_path / "objects.json").read_text(encoding="utf-8"))["methods"].items()}
    assert means["truth"]["object"] == 1.0 and means["flat-paste"]["object"] == 1.0
    assert means["background"]["object"] == 0.0  # nothing drawn: the object judge must not see one
    assert means["noise"]["object"] == 0.0
    assert means["flat-paste"]["harmony"] > means["truth"]["harmony"]  # the harmony judge tells a paste apart
    assert means["truth"]["bg_mae"] == 0.0
