"""``attnctl app`` without a browser: generated controls, compare modes, page inputs, runs.

The browser end-to-end test is ``test_app_browser.py``; everything here runs without
Gradio except the page-building tests, which skip without it.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from attnctl import StrategyManager
from attnctl.cli import main
from attnctl.errors import ConfigError, InputError
from harmonpaint_recipe.app.compare import variants
from harmonpaint_recipe.app.controls import changed_values, override_strings, sampler_controls, strategy_groups
from harmonpaint_recipe.app.editor import MIN_SIDE, editor_inputs
from harmonpaint_recipe.app.messages import error_html
from harmonpaint_recipe.app.service import AppService, RunRequest, check_seed
from harmonpaint_recipe.loading import load_recipe, resolved

TINY = ["model.pretrained=tiny", "sampler.steps=2"]
EXAMPLE_PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "region_boost" / "region_boost_plugin.py"


def _stroke_layer(size, box):
    """A transparent RGBA brush layer with one painted rectangle (what the editor sends)."""
    layer = np.zeros((size[1], size[0], 4), dtype=np.uint8)
    x0, y0, x1, y1 = box
    layer[y0:y1, x0:x1] = (255, 255, 255, 255)
    return Image.fromarray(layer, "RGBA")


@pytest.fixture
def photo(image_and_mask):
    return image_and_mask[0].convert("RGBA")


@pytest.fixture(scope="module")
def shared_pipe(tiny_pipe_dir):
    """One tiny pipeline for the module: the app itself reuses one pipeline for every run."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(tiny_pipe_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def service(shared_pipe, tmp_path):
    return AppService("harmonpaint", TINY, tmp_path / "runs", pipe=shared_pipe)


# controls -------------------------------------------------------------------------------

def test_controls_come_from_the_parameter_dataclasses():
    recipe = resolved(load_recipe("harmonpaint", TINY))
    groups = {g.instance: g for g in strategy_groups(recipe, StrategyManager())}
    assert list(groups) == ["sams", "steer", "makvs", "phases"]
    sams = {c.name: c for c in groups["sams"].controls}
    # numeric and bool fields get controls; selectors (str) and rule dicts do not
    assert set(sams) == {"enabled", "tau", "renormalize"}
    assert (sams["tau"].kind, sams["tau"].default, sams["tau"].key) == (float, 0.1, "strategies.sams.tau")
    assert "Eq. 7" in sams["tau"].help and "default 0.1" in sams["tau"].info
    assert {c.name for c in groups["makvs"].params} == {"scale", "source_image"}
    assert [c.name for c in groups["phases"].controls] == ["enabled"]
    assert [c.key for c in sampler_controls()] == ["sampler.steps", "sampler.guidance_scale", "sampler.strength", "eta"]


def test_a_third_party_plugin_gets_controls_without_ui_code(tmp_path, shared_pipe):
    spec = importlib.util.spec_from_file_location("region_boost_plugin", EXAMPLE_PLUGIN)
    plugin = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = plugin
    spec.loader.exec_module(plugin)
    manager = StrategyManager(plugins=[plugin])
    recipe_file = tmp_path / "boosted.yaml"
    recipe_file.write_text("defaults: [sdi]\nstrategies:\n  boost: {strategy: region_boost, gain: 3.0}\n")
    service = AppService(str(recipe_file), TINY, tmp_path / "runs", manager=manager, pipe=shared_pipe)
    boost = next(g for g in service.groups if g.instance == "boost")
    assert boost.strategy == "region_boost" and [c.name for c in boost.params] == ["gain"]
    gain = boost.params[0]
    assert gain.read(resolved(service.recipe(str(recipe_file)))) == 3.0 and gain.default == 2.0
    # the plugin's group only applies to the recipe that uses it
    assert gain.applies_to(resolved(service.recipe(str(recipe_file))))
    assert not gain.applies_to(resolved(service.recipe("harmonpaint")))


def test_changed_values_give_overrides_only_for_what_differs(service):
    recipe = resolved(service.recipe("harmonpaint"))
    values = [c.read(recipe) for c in service.controls]
    assert changed_values(recipe, service.controls, values) == {}
    keys = [c.key for c in service.controls]
    values[keys.index("strategies.makvs.enabled")] = False
    values[keys.index("strategies.sams.tau")] = 0.25
    values[keys.index("sampler.steps")] = 7.0  # number boxes send floats
    changes = changed_values(recipe, service.controls, values)
    assert changes == {"sampler.steps": 7, "strategies.sams.tau": 0.25, "strategies.makvs.enabled": False}
    assert override_strings(changes) == ["sampler.steps=7", "strategies.sams.tau=0.25", "strategies.makvs.enabled=false"]
    cfg, overrides = service.effective_recipe("harmonpaint", changes)
    assert cfg.strategies.makvs.enabled is False and cfg.sampler.steps == 7
    assert overrides == TINY + override_strings(changes)


def test_bad_control_values_are_errors_naming_the_key(service):
    recipe = resolved(service.recipe("harmonpaint"))
    keys = [c.key for c in service.controls]
    values = [c.read(recipe) for c in service.controls]
    values[keys.index("sampler.steps")] = 2.5
    with pytest.raises(InputError, match=r"sampler.steps: expected a whole number"):
        changed_values(recipe, service.controls, values)
    values[keys.index("sampler.steps")] = None
    with pytest.raises(InputError, match=r"sampler.steps: enter a number"):
        changed_values(recipe, service.controls, values)
    with pytest.raises(ConfigError, match=r"tau must be in \[0, 1\]"):
        service.effective_recipe("harmonpaint", {"strategies.sams.tau": 1.5})


# compare modes ---------------------------------------------------------------------------

def test_compare_modes():
    recipe = resolved(load_recipe("harmonpaint", TINY))
    a, b = variants("stock", "harmonpaint", recipe)
    assert (a.label, b.label, b.overrides) == ("stock", "harmonpaint", {})
    assert a.overrides == {f"strategies.{n}.enabled": False for n in ("sams", "steer", "makvs", "phases")}
    a, b = variants("one_off", "harmonpaint", recipe, "makvs")
    assert (a.overrides, b.overrides, b.file_stem) == ({}, {"strategies.makvs.enabled": False},
                                                      "B-harmonpaint-without-makvs")
    assert [v.slot for v in variants("single", "harmonpaint", recipe)] == ["B"]
    with pytest.raises(InputError, match="pick one of the enabled ones"):
        variants("one_off", "harmonpaint", resolved(load_recipe("sdi", TINY)), "makvs")
    with pytest.raises(InputError, match="unknown compare mode"):
        variants("sideways", "harmonpaint", recipe)


# page inputs -----------------------------------------------------------------------------

def test_editor_strokes_and_uploaded_mask_make_one_binary_mask(photo):
    layer = _stroke_layer(photo.size, (8, 8, 24, 16))
    uploaded = Image.new("L", (32, 32), 0)
    uploaded.paste(255, (16, 16, 32, 32))  # bottom-right quarter, at half the resolution
    inputs = editor_inputs({"background": photo, "layers": [layer]}, uploaded)
    mask = inputs.mask_array
    assert inputs.image.mode == "RGB" and inputs.image.size == (64, 64)
    assert mask[8:16, 8:24].all() and mask[32:, 32:].all()
    assert mask.sum() == 8 * 16 + 32 * 32
    assert any("uploaded mask resized from 32x32 to 64x64" in n for n in inputs.notes)


def test_editor_crops_to_multiples_of_8_with_a_note():
    photo = Image.new("RGBA", (70, 67), (10, 20, 30, 255))
    inputs = editor_inputs({"background": photo, "layers": [_stroke_layer(photo.size, (10, 10, 30, 30))]})
    assert inputs.image.size == (64, 64) and inputs.mask.size == (64, 64)
    assert inputs.notes[0] == "image cropped from 70x67 to 64x64 (sides must be multiples of 8)"


@pytest.mark.parametrize("editor, message", [
    (None, "no image: upload an image"),
    ({"background": Image.new("RGBA", (48, 96)), "layers": []}, f"image is too small \\(48x96\\); it needs at least {MIN_SIDE}"),
    ({"background": Image.new("RGBA", (64, 64)), "layers": []}, "no mask: paint over the region"),
    ({"background": Image.new("RGBA", (64, 64)), "layers": [Image.new("RGBA", (64, 64))]}, "no mask: paint"),
])
def test_editor_bad_inputs(editor, message):
    with pytest.raises(InputError, match=message):
        editor_inputs(editor)


# runs ------------------------------------------------------------------------------------

def _inputs(photo):
    return editor_inputs({"background": photo, "layers": [_stroke_layer(photo.size, (16, 20, 44, 48))]})


def test_empty_prompt_is_refused_only_where_a_strategy_reads_prompt_tokens(service, photo):
    request = RunRequest(_inputs(photo), "  ", 1, "harmonpaint")
    with pytest.raises(InputError, match=r"empty prompt: harmonpaint steers the prompt's own tokens \(steer"):
        service.plan(request)
    # the stock side alone, and a recipe whose guidance is off, need no prompt
    assert len(service.plan(RunRequest(_inputs(photo), "", 1, "sdi", mode="single"))) == 1
    assert len(service.plan(RunRequest(_inputs(photo), "", 1, "harmonpaint",
                                       {"strategies.steer.enabled": False}))) == 2


@pytest.mark.parametrize("seed", [-1, 2.5, None, "abc", 2**32])
def test_bad_seeds(seed):
    with pytest.raises(InputError, match="seed: enter a whole number"):
        check_seed(seed)


def test_run_writes_outputs_that_the_api_and_the_sidecar_reproduce(service, photo, shared_pipe, tmp_path, capsys):
    import harmonpaint_recipe as hp

    steps = []
    request = RunRequest(_inputs(photo), "a red boat", 77, "harmonpaint", {"strategies.sams.tau": 0.2},
                         mode="one_off", off_instance="makvs")
    result = service.run(request, lambda fraction, text: steps.append((fraction, text)))
    assert [o.variant.label for o in result.outputs] == ["harmonpaint", "harmonpaint without makvs"]
    assert steps == [
        (0.0, "A: harmonpaint"), (0.25, "A: harmonpaint, step 1/2"), (0.5, "A: harmonpaint, step 2/2"),
        (0.5, "B: harmonpaint without makvs"), (0.75, "B: harmonpaint without makvs, step 1/2"),
        (1.0, "B: harmonpaint without makvs, step 2/2"), (1.0, "done"),
    ]
    assert [p.name for p in result.files()] == [
        f"{result.run_dir.name}_{stem}" for stem in
        ("A-harmonpaint.png", "A-harmonpaint.json", "B-harmonpaint-without-makvs.png",
         "B-harmonpaint-without-makvs.json", "mask.png", "input.png")
    ]
    for output, extra in zip(result.outputs, ([], ["strategies.makvs.enabled=false"])):
        record = json.loads(output.sidecar_path.read_text())
        overrides = TINY + ["strategies.sams.tau=0.2"] + extra
        assert (record["seed"], record["prompt"], record["recipe_name"]) == (77, "a red boat", "harmonpaint")
        assert record["overrides"] == overrides
        expected = hp.inpaint(result.image_path, result.mask_path, "a red boat", recipe=hp.load_recipe("harmonpaint", overrides),
                              pipe=shared_pipe, seed=77)
        assert np.array_equal(np.asarray(Image.open(output.image_path)), np.asarray(expected))
        assert "--seed 77" in output.command and "strategies.sams.tau=0.2" in output.command
    again = tmp_path / "again.png"
    assert main(["inpaint", "--from", str(result.outputs[1].sidecar_path), "--out", str(again)]) == 0
    assert "identical to the image recorded" in capsys.readouterr().out


def test_runs_do_not_overlap(service, photo, monkeypatch):
    """Two requests at once: the second waits for the first (one pipeline, one run at a time)."""
    import harmonpaint_recipe.app.service as service_module
    from harmonpaint_recipe.runner import RunResult

    active, peak, results = [0], [0], []

    class SlowRunner:
        def __init__(self, pipe, recipe, manager=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def __call__(self, inputs, prompt, seed, on_step=None):
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            time.sleep(0.2)
            active[0] -= 1
            return RunResult(image=inputs.image, seed=seed)

    monkeypatch.setattr(service_module, "Runner", SlowRunner)
    def request(seed):
        results.append(service.run(RunRequest(_inputs(photo), "a cat", seed, "harmonpaint")))

    threads = [threading.Thread(target=request, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and peak[0] == 1
    assert sorted(r.seed for r in results) == [1, 2] and len(list(service.out_dir.iterdir())) == 2


@pytest.mark.filterwarnings("ignore::attnctl.RunWarning")  # 2 steps: HarmonPaint's structure phase is empty
def test_the_probes_tab_draws_what_the_last_run_measured(shared_pipe, photo, tmp_path):
    pytest.importorskip("gradio", reason='the probes tab needs Gradio: pip install -e ".[app]"')
    from harmonpaint_recipe.app.probe_tab import NO_PROBES, NO_RUN, probe_gallery

    probed = AppService("harmonpaint", TINY + ["probes.cross_maps.enabled=true", "probes.curves.enabled=true"],
                        tmp_path / "runs", pipe=shared_pipe)
    result = probed.run(RunRequest(_inputs(photo), "a red boat", 5, "harmonpaint"))
    assert [o.probe_run.label for o in result.outputs] == ["A: stock", "B: harmonpaint"]
    gallery, status = probe_gallery(result)
    assert [name for _, name in gallery] == ["cross_maps", "curves"] and "A: stock, B: harmonpaint" in status
    assert all(image.width > 500 for image, _ in gallery)
    plain = AppService("harmonpaint", TINY, tmp_path / "plain", pipe=shared_pipe)
    assert probe_gallery(plain.run(RunRequest(_inputs(photo), "a red boat", 5, "harmonpaint", mode="single"))) == (
        [], NO_PROBES)
    assert probe_gallery(None) == ([], NO_RUN)


def test_recipe_choices_follow_the_loaded_model_family(service):
    assert service.recipe_choices[0] == "harmonpaint"
    assert "sdi" in service.recipe_choices and "harmonpaint-sdxl" not in service.recipe_choices
    with pytest.raises(InputError, match="recipe 'harmonpaint-sdxl' is not offered here"):
        service.effective_recipe("harmonpaint-sdxl")


# page, messages, command -----------------------------------------------------------------

def test_error_html_shows_the_message_not_a_traceback():
    shown = error_html(InputError("no mask: paint <here>"))
    assert "no mask: paint &lt;here&gt;" in shown and 'role="alert"' in shown
    shown = error_html(KeyError("boom"))
    assert "internal error (KeyError" in shown and "server log" in shown and "Traceback" not in shown


def test_page_builds_with_an_extra_tab_and_queues_runs_one_at_a_time(service):
    gr = pytest.importorskip("gradio", reason='the page needs Gradio: pip install -e ".[app]"')
    from harmonpaint_recipe.app.page import build_page

    seen = []

    def probes_tab(last_run):
        with gr.Tab("Probes"):
            seen.append(last_run)

    from harmonpaint_recipe.app.probe_tab import probe_tab

    blocks = build_page(service, extra_tabs=[probes_tab, probe_tab])
    assert len(seen) == 1 and isinstance(seen[0], gr.State)
    run = [fn for fn in blocks.fns.values() if fn.concurrency_id == "pipeline"]
    assert len(run) == 1 and run[0].concurrency_limit == 1 and run[0].name == "run"
    config = blocks.get_config_file()
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"image-editor", "prompt", "recipe", "seed", "run", "output-a", "output-b", "downloads",
            "ctl-strategies-makvs-enabled", "ctl-strategies-sams-tau", "recipe-yaml", "show-probes",
            "probe-gallery"} <= ids


def test_app_command_without_gradio_names_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["app", "model.pretrained=tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnctl app: error: attnctl app needs Gradio") and 'pip install -e ".[app]"' in err


def test_app_command_refuses_a_busy_port_before_loading_the_model(capsys, monkeypatch):
    import socket

    import harmonpaint_recipe.app.service as service_module

    pytest.importorskip("gradio", reason='the app needs Gradio: pip install -e ".[app]"')

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although the port is busy")

    monkeypatch.setattr(service_module, "load_pipeline", no_model)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", "--port", str(port), "model.pretrained=tiny"]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "pick another with --port" in err


# faults, limits and exposure, in process (the served page: test_app_server.py, test_app_faults.py)

def test_a_sidecar_that_cannot_be_written_takes_its_image_along(service, photo, monkeypatch):
    import harmonpaint_recipe.app.service as service_module
    from harmonpaint_recipe.app.service import OutputError

    real, calls = service_module.write_sidecar, []

    def fail_second(path, record):
        calls.append(path)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied", str(path))
        real(path, record)

    monkeypatch.setattr(service_module, "write_sidecar", fail_second)
    with pytest.raises(OutputError) as caught:
        service.run(RunRequest(_inputs(photo), "a red boat", 3, "harmonpaint"))
    message = str(caught.value)
    assert message.startswith(f"cannot write to the output folder '{service.out_dir}' '{calls[1]}' (Permission denied)")
    assert "kept: " in message and "_A-stock.png with sidecars" in message and "another --out-dir" in message
    run_dir = calls[0].parent
    assert sorted(p.name.split("_", 1)[1] for p in run_dir.iterdir()) == ["A-stock.json", "A-stock.png", "input.png",
                                                                         "mask.png"]


def test_a_stopping_service_ends_the_run_at_its_next_step(service, photo, monkeypatch):
    from harmonpaint_recipe.app.service import RunStopped

    steps = []

    def progress(fraction, text):
        steps.append(text)
        if text.endswith("step 1/2") and text.startswith("B"):
            service.stop()

    with pytest.raises(RunStopped, match=r"the server is stopping; B: harmonpaint ended after step 2/2"):
        service.run(RunRequest(_inputs(photo), "a red boat", 3, "harmonpaint"), progress)
    assert service.wait_idle(timeout=5)
    with pytest.raises(RunStopped, match="the server is stopping; run again once it is back"):
        service.run(RunRequest(_inputs(photo), "a red boat", 4, "harmonpaint"))


def test_a_pipeline_that_raises_is_a_run_failure_and_the_pipeline_is_left_as_it_was(service, photo, monkeypatch,
                                                                                shared_pipe):
    from harmonpaint_recipe.app.service import RunFailed

    processors = dict(shared_pipe.unet.attn_processors)
    scheduler = shared_pipe.scheduler

    def explode(done, total):
        raise RuntimeError("out of memory, say")

    with pytest.raises(RunFailed, match=r"the run failed in the pipeline \(RuntimeError: out of memory, say\)"):
        service.run(RunRequest(_inputs(photo), "a cat", 5, "harmonpaint"), lambda f, text: "step" in text and explode(0, 0))
    assert dict(shared_pipe.unet.attn_processors) == processors and shared_pipe.scheduler is scheduler


@pytest.mark.parametrize("prompt, message", [
    ("x" * 2001, "prompt is 2,001 characters long"),
    ("a\x00cat", "prompt holds the control character U+0000 at position 2"),
    ("a \x7f cat", "U+007F"),
    (42, "prompt: expected text, got 42"),
])
def test_bad_prompts(prompt, message):
    import re

    from harmonpaint_recipe.app.checks import check_prompt

    with pytest.raises(InputError, match=re.escape(message)):
        check_prompt(prompt)


def test_prompts_that_pass_and_the_note_past_the_text_window(shared_pipe):
    from harmonpaint_recipe.app.checks import check_prompt, prompt_note

    for text in ("a small owl", "two lines\nof prompt\twith a tab", "一只猫头鹰 🦉 café", None):
        assert check_prompt(text) == (text or "")
    assert prompt_note(shared_pipe.tokenizer, "a small owl") is None
    note = prompt_note(shared_pipe.tokenizer, "owl " * 200)
    assert note and "the text encoder reads the first 77" in note


@pytest.mark.parametrize("key, value, message", [
    ("sampler.steps", 0, "sampler.steps: enter a number from 1 to 1000, got 0"),
    ("sampler.steps", 5000, "sampler.steps: enter a number from 1 to 1000, got 5000"),
    ("sampler.strength", 0.0, "sampler.strength: enter a number above 0.0, at most 1.0, got 0.0"),
    ("sampler.guidance_scale", -1, "sampler.guidance_scale: enter a number from 0.0 to 100.0"),
    ("eta", 1.5, "eta: enter a number from 0.0 to 1.0, got 1.5"),
    ("sampler.steps", "ten", "sampler.steps: enter a number \\(default 50\\), got 'ten'"),
    ("sampler.steps", True, "sampler.steps: enter a number"),
])
def test_sampler_values_outside_what_the_page_accepts(key, value, message):
    control = next(c for c in sampler_controls() if c.key == key)
    with pytest.raises(InputError, match=message):
        control.coerce(value)


def test_unreadable_and_oversized_images_are_named(photo):
    from harmonpaint_recipe.app.editor import MAX_PIXELS, Unreadable

    with pytest.raises(InputError, match=r"^image: the file is broken$"):
        editor_inputs(Unreadable(None, "the file is broken"))
    with pytest.raises(InputError, match=r"^uploaded mask: not an image$"):
        editor_inputs({"background": photo, "layers": []}, Unreadable(b"x", "not an image"))
    side = int(MAX_PIXELS ** 0.5) + 8
    with pytest.raises(InputError, match=rf"image is too large \({side}x{side} = "):
        editor_inputs({"background": Image.new("RGB", (side, side)), "layers": []})


def test_host_other_than_loopback_warns_what_remote_users_can_do(monkeypatch, capsys):
    pytest.importorskip("gradio", reason='the app needs Gradio: pip install -e ".[app]"')
    import harmonpaint_recipe.app.server as server_module

    served = []
    monkeypatch.setattr(server_module, "serve", lambda *args, **kwargs: served.append(args))
    assert main(["app", "--host", "0.0.0.0", "--port", "7999", "model.pretrained=tiny"]) == 0
    err = capsys.readouterr().err
    assert err.count("attnctl app: warning: --host 0.0.0.0 makes the page reachable from other machines") == 1
    for part in ("no login", "run jobs on this machine's model", "read every input, mask, output and sidecar in "
                 "'out/app'", "127.0.0.1, serves this machine alone"):
        assert part in err
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert main(["app", "--host", host, "--port", "7999", "model.pretrained=tiny"]) == 0
        assert "warning" not in capsys.readouterr().err
    assert len(served) == 5


def test_one_server_per_output_folder_and_leftovers_of_a_killed_one_are_removed(tmp_path):
    from harmonpaint_recipe.app.outdir import claim_out_dir

    run = tmp_path / "out" / "20260101-000000-seed1"
    run.mkdir(parents=True)
    (run / "20260101-000000-seed1_A-stock.png").write_bytes(b"png")
    (run / "20260101-000000-seed1_A-stock.json").write_text("{}")
    (run / "20260101-000000-seed1_B-x.png").write_bytes(b"png without its sidecar")
    (run / ".20260101-000000-seed1_B-x.json.abc.tmp").write_text("half")
    claimed = claim_out_dir(tmp_path / "out")
    try:
        assert [p.name for p in claimed.removed] == [".20260101-000000-seed1_B-x.json.abc.tmp"]
        assert [p.name for p in claimed.unrecorded] == ["20260101-000000-seed1_B-x.png"]
        with pytest.raises(InputError, match=rf"is in use by another attnctl app \(pid {__import__('os').getpid()}\)"):
            claim_out_dir(tmp_path / "out")
    finally:
        claimed.release()
    claim_out_dir(tmp_path / "out").release()  # free again
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="--out-dir .* cannot be used"):
        claim_out_dir(tmp_path / "file" / "out")


def test_attnctl_app_serves_its_page_on_this_python(served_app):
    """The command itself, in a process of its own: it serves (on 3.11.7 it once died building
    its routes after a dropped event loop's warning) and prints no such warning."""
    import urllib.request

    served_app.wait_until_serving()
    with urllib.request.urlopen(served_app.url + "config", timeout=30) as response:
        config = json.load(response)
    assert {"image-editor", "prompt", "run", "status"} <= {c["props"].get("elem_id") for c in config["components"]}
    log = served_app.log()
    assert "Traceback" not in log and "unclosed event loop" not in log and "ResourceWarning" not in log
    assert f"outputs go to {served_app.out_dir.resolve()}" in log


def test_paste_back_is_a_switch_on_the_page_and_runs_as_the_api_does(service, photo, shared_pipe):
    import harmonpaint_recipe as hp

    keys = [c.key for c in service.controls]
    assert keys.index("output.paste_back") < keys.index("strategies.sams.enabled")  # the page's order
    toggle = next(c for c in service.controls if c.key == "output.paste_back")
    assert toggle.kind is bool and toggle.default is False
    request = RunRequest(_inputs(photo), "a red boat", 5, "sdi", {"output.paste_back": True}, mode="single")
    result = service.run(request)
    record = json.loads(result.outputs[0].sidecar_path.read_text())
    assert "output.paste_back=true" in record["overrides"]
    expected = hp.inpaint(result.image_path, result.mask_path, "a red boat", recipe=hp.load_recipe("sdi", record["overrides"]),
                          pipe=shared_pipe, seed=5)
    pasted = np.asarray(Image.open(result.outputs[0].image_path))
    assert np.array_equal(pasted, np.asarray(expected))
    source = np.asarray(Image.open(result.image_path).convert("RGB"))
    from harmonpaint_recipe.paste_back import paste_weights

    far = paste_weights(np.asarray(Image.open(result.mask_path).convert("L")) / 255.0, 2.0) == 0
    assert far.any() and np.array_equal(pasted[far], source[far])  # beyond the soft edge the input is kept exactly
