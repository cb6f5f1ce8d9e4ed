"""``attnctl app`` when things go wrong: a run that raises inside the pipeline, a client that
disconnects in the middle of its run, an output folder that stops being writable, the server
stopped or killed in the middle of a run and started again on the same folder.

The server is started on a recipe with a strategy plugin that raises at a chosen denoising
step (installed as a package, found through its entry point, its step set from the page like
any parameter). After each fault the server must keep serving (or, stopped, serve again after a
restart), say what happened, and leave only complete files, every output with its sidecar; the
next run must still make exactly the image the Python API makes (the pipeline was left as it was).

SIGTERM (or Ctrl+C) mid-run: the run ends at its next step, the outputs it finished stay with
their sidecars and the process exits 0. A server killed outright (SIGKILL) can leave a temporary
file of an interrupted write: the next start removes it and says so. While one server runs, a
second one on the same folder is refused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app_server import TINY, RunApi, check_folder, editor_value, make_case, make_server, png_bytes, sha256, status_text

pytest.importorskip("gradio_client", reason='the app tests need Gradio: pip install -e ".[test]"')

pytestmark = pytest.mark.slow

FAULT_PLUGIN = '''
"""A strategy that raises from denoising step ``fail_at_step`` on (-1: never); otherwise it
reweights nothing (an identity reweighting at one site)."""

from dataclasses import dataclass, field

import attnctl
from attnctl import ReweightOp, StrategySpec, select_sites


@dataclass(frozen=True)
class FaultParams:
    sites: str = field(default="self[0]", metadata={"help": "where it acts"})
    fail_at_step: int = field(default=-1, metadata={"help": "step from which the pipeline raises (-1: never)"})


@dataclass(eq=False)
class FaultOp(ReweightOp):
    fail_at_step: int = field(default=-1, kw_only=True)

    def factors(self, call):
        step = call.state.step_index or 0
        if 0 <= self.fail_at_step <= step:
            raise RuntimeError(f"injected fault at step {step}")
        one = call.query.new_ones(1, 1, 1, 1)
        return [(one, one)]


@attnctl.hookimpl
def attnctl_add_strategies():
    return [StrategySpec("fault", "raises at a chosen step (a test's plugin)", FaultParams)]


@attnctl.hookimpl
def attnctl_plan(instance, spec, params, sites):
    if spec.name != "fault":
        return None
    return [FaultOp(instance, site=s, fail_at_step=params.fail_at_step) for s in select_sites(params.sites, sites)]
'''

DISCONNECTING_CLIENT = '''
import sys, time
from gradio_client import Client, handle_file
url, image, layer, seed = sys.argv[1:5]
args = __import__("json").loads(sys.argv[5])
client = Client(url, verbose=False)
editor = {"background": handle_file(image), "layers": [handle_file(layer)], "composite": None, "id": None}
args[0] = editor
client.submit(*args, api_name="/run")
print("submitted", flush=True)
time.sleep(600)  # killed before this ends
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("fault-site")
    (site / "fault_strategy.py").write_text(FAULT_PLUGIN)
    info = site / "fault_strategy-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fault-strategy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[attnctl.strategies]\nfault = fault_strategy\n")
    sys.path.insert(0, str(site))  # this process computes the expected images with the same plugin
    yield site
    sys.path.remove(str(site))


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fault-recipe") / "faulty.yaml"
    path.write_text("defaults: [sdi]\nstrategies:\n  fault: {strategy: fault, sites: 'self[0]'}\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, plugin_site, recipe_file):
    env = {"PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    app = make_server(tmp_path_factory.mktemp("faults"), args=["--recipe", str(recipe_file), *TINY], env=env).start()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="module")
def api(server):
    server.wait_until_serving()
    return RunApi(server.url)


@pytest.fixture(scope="module")
def api_pipe(server):
    import harmonpaint_recipe as hp

    pipe = hp.load_pipeline(hp.load_recipe("sdi", TINY))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _expected_b(case, recipe_file, pipe):
    import harmonpaint_recipe as hp

    recipe = hp.load_recipe(str(recipe_file), TINY)
    return hp.inpaint(case.image, case.mask, case.prompt, recipe=recipe, pipe=pipe, seed=case.seed)


def _run_case(client, api, case, recipe_file, **values):
    return client.predict(*api.args(image_editor=editor_value(case.image, case.layer), prompt=case.prompt,
                                    seed=case.seed, recipe=str(recipe_file), **values), api_name="/run")


def _b_bytes(result) -> bytes:
    return next(Path(p) for p in result[3] if "_B-" in Path(p).name and p.endswith(".png")).read_bytes()


def test_a_run_that_raises_in_the_pipeline_is_reported_and_the_next_is_right(server, api, api_pipe, recipe_file,
                                                                          tmp_path):
    client = api.client()
    case = make_case(tmp_path, 1)
    failed = _run_case(client, api, case, recipe_file, controls={"strategies.fault.fail_at_step": 1})
    status = status_text(failed)
    assert "attnctl-error" in str(failed[4])
    assert "the run failed in the pipeline (RuntimeError: injected fault at step 1); kept: " in status
    assert "_A-stock.png with sidecars; the server log has the details" in status
    assert "Traceback" not in status
    server.wait_for_log(r"run \d+ failed in the pipeline")
    assert "RuntimeError: injected fault at step 1" in server.log()  # the traceback is in the log
    run_dir = next(server.out_dir.glob(f"*seed{case.seed}"))
    assert sorted(p.name.split("_", 1)[1] for p in run_dir.iterdir()) == [
        "A-stock.json", "A-stock.png", "input.png", "mask.png"]  # B never finished: nothing of it
    check_folder(server.out_dir)

    again = _run_case(client, api, case, recipe_file)
    assert "attnctl-done" in str(again[4]), status_text(again)
    assert sha256(_b_bytes(again)) == sha256(png_bytes(_expected_b(case, recipe_file, api_pipe)))


def test_a_client_that_disconnects_mid_run_does_not_stop_the_others(server, api, api_pipe, recipe_file, tmp_path):
    import json

    leaving, staying = make_case(tmp_path, 2), make_case(tmp_path, 3)
    args = api.args(image_editor=None, prompt=leaving.prompt, seed=leaving.seed, recipe=str(recipe_file),
                    controls={"sampler.steps": 40})
    gone = subprocess.Popen([sys.executable, "-c", DISCONNECTING_CLIENT, server.url, str(leaving.image),
                             str(leaving.layer), str(leaving.seed), json.dumps(args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        server.wait_for_log(rf"run \d+ started: seed {leaving.seed}")
        client = api.client()
        queued = client.submit(*api.args(image_editor=editor_value(staying.image, staying.layer),
                                         prompt=staying.prompt, seed=staying.seed, recipe=str(recipe_file)),
                               api_name="/run")
    finally:
        gone.kill()  # the leaving client drops its connection in the middle of its run
        gone.wait()
    result = queued.result(timeout=600)
    assert "attnctl-done" in str(result[4]), status_text(result)
    assert sha256(_b_bytes(result)) == sha256(png_bytes(_expected_b(staying, recipe_file, api_pipe)))
    server.wait_for_log(rf"run \d+ (done|failed|stopped)[^\n]*seed{leaving.seed}")
    check_folder(server.out_dir)
    assert server.process.poll() is None


def test_an_unwritable_output_folder_is_reported_and_serving_goes_on(server, api, api_pipe, recipe_file, tmp_path):
    client = api.client()
    case = make_case(tmp_path, 4)
    aside = server.out_dir.with_name("runs-aside")
    os.rename(server.out_dir, aside)
    server.out_dir.write_text("a file where the output folder was\n")  # nothing can be created in it
    try:
        refused = _run_case(client, api, case, recipe_file)
    finally:
        server.out_dir.unlink()
        os.rename(aside, server.out_dir)
    status = status_text(refused)
    assert "attnctl-error" in str(refused[4])
    assert f"cannot write to the output folder '{server.out_dir}'" in status and "Not a directory" in status
    assert "restart the app with another --out-dir" in status
    if os.geteuid() != 0:  # permissions bind everyone but root
        os.chmod(server.out_dir, 0o555)
        try:
            denied = _run_case(client, api, case, recipe_file)
        finally:
            os.chmod(server.out_dir, 0o755)
        assert "Permission denied" in status_text(denied)
    result = _run_case(client, api, case, recipe_file)
    assert "attnctl-done" in str(result[4]), status_text(result)
    assert sha256(_b_bytes(result)) == sha256(png_bytes(_expected_b(case, recipe_file, api_pipe)))
    check_folder(server.out_dir)
    assert server.process.poll() is None


# stopped and started again --------------------------------------------------------------

LONG_STEPS = 150  # a run long enough to be caught in the middle


def _long_run(api, case):
    client = api.client()
    return client.submit(*api.args(image_editor=editor_value(case.image, case.layer), prompt=case.prompt,
                                   seed=case.seed, controls={"sampler.steps": LONG_STEPS}), api_name="/run")


def _serves_the_right_image(server, case, recipe_file, pipe):
    api = RunApi(server.url)
    result = api.client().predict(*api.args(image_editor=editor_value(case.image, case.layer), prompt=case.prompt,
                                            seed=case.seed, compare_mode="single"), api_name="/run")
    assert "attnctl-done" in str(result[4]), status_text(result)
    assert sha256(_b_bytes(result)) == sha256(png_bytes(_expected_b(case, recipe_file, pipe)))


def _wait_for_file(server, pattern: str, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while not (found := sorted(server.out_dir.glob(pattern))):
        assert time.monotonic() < deadline and server.process.poll() is None, f"no {pattern}:\n{server.log()}"
        time.sleep(0.05)
    return found[0]


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p.read_bytes()) for p in folder.rglob("*") if p.is_file()
            and p.name != ".attnctl-app.lock"}


def _stopped_in_b(server, case) -> Path:
    """The run folder of ``case`` once its A is finished (B is being made then)."""
    server.wait_for_log(rf"run \d+ started: seed {case.seed}")
    return _wait_for_file(server, f"*seed{case.seed}/*_A-stock.json").parent


def test_a_server_stopped_mid_run_keeps_finished_outputs_and_serves_again_after_a_restart(
        server, api, api_pipe, recipe_file, tmp_path):
    second = make_server(tmp_path / "second", out_dir=server.out_dir).start()
    assert second.process.wait(timeout=180) == 2
    assert f"--out-dir '{server.out_dir}' is in use by another attnctl app (pid {server.process.pid})" in second.log()

    # killed outright in the middle of B: whatever was finished is complete, with its sidecar
    killed = make_case(tmp_path / "in", 5)
    _long_run(api, killed)
    run_dir = _stopped_in_b(server, killed)
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    check_folder(server.out_dir)
    # a temporary file, as a server killed in the middle of a write leaves one
    leftover = run_dir / f".{run_dir.name}_B-faulty.png.x1y2z3.tmp"
    leftover.write_bytes(b"half a png")
    before = _snapshot(server.out_dir)

    server.start()  # the kernel dropped the dead server's lock
    server.wait_until_serving()
    assert f"removed 1 temporary file(s) that an interrupted server left in {server.out_dir}" in server.log()
    assert not leftover.exists()
    del before[str(leftover.relative_to(server.out_dir))]
    assert _snapshot(server.out_dir) == before  # the finished outputs were not touched
    _serves_the_right_image(server, make_case(tmp_path / "in", 6), recipe_file, api_pipe)

    # stopped (SIGTERM, as Ctrl+C) in the middle of B: B ends at its next step, A stays
    stopped = make_case(tmp_path / "in", 7)
    _long_run(RunApi(server.url), stopped)
    run_dir = _stopped_in_b(server, stopped)
    assert server.stop(signal.SIGTERM) == 0
    log = server.log()
    assert "stopping: no new runs; the run in progress ends at its next step" in log
    assert f"stopped: the server is stopping; B: {recipe_file} ended after step" in log
    assert log.rstrip().endswith("stopped")
    assert sorted(p.name.split("_", 1)[1] for p in run_dir.iterdir()) == [
        "A-stock.json", "A-stock.png", "input.png", "mask.png"]  # A with its sidecar; nothing of B
    check_folder(server.out_dir)
