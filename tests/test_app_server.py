"""``attnctl app`` as a server: under load, against bad input, and as remote users see it.

All through the page's API, like any client (``gradio_client``, or raw HTTP where a client
would refuse to send), against one running server (``served_app`` in conftest).

- **Load**: several clients at once, each with its own image, stroke, prompt, seed and one
  parameter of its own, must each get their own images back, byte for byte what the Python
  API makes from the same inputs alone (the clients' expected images all differ, so a mix-up
  cannot pass), in the order the queue took them, with nothing lost or overwritten; the
  server's memory is sampled and a second wave must not raise the peak past the first by much.
- **Bad input**: each must come back as a message in the status box naming the input and the
  fix, never a traceback or Gradio's bare "Error", and the server goes on serving.
- **Exposure**: the server listens on 127.0.0.1 only, no file outside the output folder can be
  read through it, a request cannot point it at a file of the server, and the page's API takes
  no path, override or model choice.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app_server import ALL_OFF, TINY, RunApi, check_folder, editor_value, make_case, png_bytes, sha256, status_text

pytest.importorskip("gradio_client", reason='the app tests need Gradio: pip install -e ".[test]"')
psutil = pytest.importorskip("psutil", reason='the memory checks need psutil: pip install -e ".[test]"')

pytestmark = pytest.mark.slow

CLIENTS = 6
RESULT_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def server(served_app):
    served_app.wait_until_serving()
    return served_app


@pytest.fixture(scope="module")
def api(server, app_api_pipe):
    return RunApi(server.url)


@pytest.fixture(scope="module")
def client(api):
    return api.client()


# load -------------------------------------------------------------------------------------

class MemorySampler:
    """The server's resident memory, sampled every 50 ms while a block runs."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _submit_in_order(api, cases):
    """One client per case; each request is in the queue before the next is sent."""
    from gradio_client.utils import Status

    jobs = []
    for case in cases:
        client = api.client()
        job = client.submit(*api.args(image_editor=editor_value(case.image, case.layer), prompt=case.prompt,
                                      seed=case.seed, controls=case.edits), api_name="/run")
        while job.status().code in (Status.STARTING, Status.JOINING_QUEUE):
            time.sleep(0.02)
        jobs.append(job)
    return jobs


def _expected(case, pipe):
    """What the Python API makes, alone, for the case: A (every strategy off) and B (the recipe)."""
    import harmonpaint_recipe as hp

    made = {}
    for slot, overrides in (("A-stock", TINY + case.overrides + ALL_OFF), ("B-harmonpaint", TINY + case.overrides)):
        recipe = hp.load_recipe("harmonpaint", overrides)
        made[slot] = hp.inpaint(case.image, case.mask, case.prompt, recipe=recipe, pipe=pipe, seed=case.seed)
    return made


def _cases(folder: Path, first: int, count: int):
    cases = [make_case(folder, i) for i in range(first, first + count)]
    for i, case in enumerate(cases):
        tau = round(0.05 + 0.04 * (first + i), 2)  # a parameter of each client's own
        case.edits = {"strategies.sams.tau": tau}
        case.overrides = [f"strategies.sams.tau={tau}"]
    return cases


def test_clients_at_once_each_get_their_own_images_in_queue_order(server, api, app_api_pipe, tmp_path):
    peaks = []
    all_cases = []
    before = check_folder(server.out_dir)
    for wave in range(2):
        cases = _cases(tmp_path / "inputs", wave * CLIENTS, CLIENTS)
        with MemorySampler(server.process.pid) as memory:
            jobs = _submit_in_order(api, cases)
            results = [job.result(timeout=RESULT_TIMEOUT_S) for job in jobs]
        peaks.append(memory.peak)
        all_cases += cases

        expected = {case.name: _expected(case, app_api_pipe) for case in cases}
        b_images = [np.asarray(e["B-harmonpaint"]).tobytes() for e in expected.values()]
        assert len(set(b_images)) == len(cases)  # every client's own image differs: a mix-up would show
        for case, result in zip(cases, results):
            status = status_text(result)
            assert "attnctl-error" not in str(result[4]) and f"seed {case.seed}:" in status, status
            downloads = {Path(p).name.split("_", 1)[1]: Path(p) for p in result[3]}
            assert set(downloads) == {"A-stock.png", "A-stock.json", "B-harmonpaint.png", "B-harmonpaint.json",
                                      "mask.png", "input.png"}
            for slot, image in expected[case.name].items():
                got = downloads[f"{slot}.png"].read_bytes()
                assert sha256(got) == sha256(png_bytes(image)), f"{case.name} {slot} is not its own image"
                record = json.loads(downloads[f"{slot}.json"].read_text())
                assert (record["seed"], record["prompt"]) == (case.seed, case.prompt)
            mask = np.asarray(Image.open(downloads["mask.png"]))
            assert np.array_equal(mask, np.asarray(case.mask))

    # the queue's order: the server started the runs in the order the requests joined it
    seeds = [case.seed for case in all_cases]
    assert [s for s in server.runs_started() if s in seeds] == seeds
    # nothing lost or overwritten: one run folder per request, every output complete with its sidecar
    counted = check_folder(server.out_dir)
    assert counted == {"runs": before["runs"] + 2 * CLIENTS, "outputs": before["outputs"] + 4 * CLIENTS}
    # bounded memory: the second wave of as many clients does not raise the peak by more than 10 %
    print(f"\nserver peak memory: wave 1 {peaks[0] / 2**20:.0f} MiB, wave 2 {peaks[1] / 2**20:.0f} MiB "
          f"({2 * CLIENTS} clients, {2 * CLIENTS} requests, {4 * CLIENTS} outputs)")
    assert peaks[1] < peaks[0] * 1.10


# bad input -------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(path: Path, side: int) -> Path:
    """A valid, fully decodable grey PNG of side x side pixels, a few hundred KB on disk."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + side)  # filter byte, then black pixels
    data = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
                     + _png_chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-files")
    case = make_case(folder, 0)
    (folder / "not-an-image.png").write_text("this is text, not a picture\n")
    good = case.image.read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "small.png")
    Image.new("L", (64, 64), 0).save(folder / "empty-mask.png")
    Image.new("L", (64, 64), 255).save(folder / "full-mask.png")
    half = Image.new("L", (32, 32), 0)
    half.paste(255, (8, 8, 24, 24))
    half.save(folder / "half-size-mask.png")
    (folder / "huge-upload.png").write_bytes(b"\x89PNG" + b"\x00" * (21 * 2**20))  # over the 20 MB upload limit
    _bomb_png(folder / "bomb.png", 12_000)
    return {"case": case, "folder": folder, **{p.stem: p for p in folder.iterdir()}}


def _run(client, api, **values):
    return client.predict(*api.args(**values), api_name="/run")


def _editor(files, image="case", layer=True):
    case = files["case"]
    background = case.image if image == "case" else files[image]
    return editor_value(background, case.layer if layer else None)


# name -> (arguments of the run endpoint, given the files; the status box's class; text it must hold)
BAD_INPUTS = {
    "not an image": (lambda f: dict(image_editor=_editor(f, "not-an-image")), "error",
                     "image: the uploaded file cannot be read as an image (cannot identify image file); upload a PNG"),
    "a truncated image file": (lambda f: dict(image_editor=_editor(f, "truncated")), "error",
                               "image: the uploaded file cannot be read as an image"),
    "no image at all": (lambda f: dict(image_editor=None), "error", "no image: upload an image into the editor"),
    "an image below 64x64": (lambda f: dict(image_editor=_editor(f, "small", layer=False),
                                            mask_upload=_file(f["half-size-mask"])), "error",
                             "image is too small (32x32); it needs at least 64x64 pixels"),
    "a huge image (a 12000x12000 PNG)": (lambda f: dict(image_editor=_editor(f, "bomb")), "error",
                                        "image is too large (12000x12000 = 144,000,000 pixels); the app takes at most "
                                        "4,194,304 pixels"),
    "an empty mask": (lambda f: dict(image_editor=_editor(f, layer=False), mask_upload=_file(f["empty-mask"])),
                      "error", "no mask: paint over the region to inpaint with the brush (or upload a mask"),
    "a full mask": (lambda f: dict(image_editor=_editor(f, layer=False), mask_upload=_file(f["full-mask"])),
                    "done", "mask covers 100% of the image (> 90%): the unmasked style source is too small"),
    "a mask of another size": (lambda f: dict(image_editor=_editor(f, layer=False),
                                              mask_upload=_file(f["half-size-mask"])), "done",
                               "uploaded mask resized from 32x32 to 64x64 (nearest)"),
    "a mask that is not an image": (lambda f: dict(image_editor=_editor(f), mask_upload=_file(f["not-an-image"])),
                                    "error", "uploaded mask: the uploaded file cannot be read as an image"),
    "a negative seed": (lambda f: dict(image_editor=_editor(f), seed=-5), "error",
                        "seed: enter a whole number from 0 to 4294967295 (or click 'new seed'), got -5"),
    "an absurd seed": (lambda f: dict(image_editor=_editor(f), seed=10**30), "error",
                       "seed: enter a whole number from 0 to 4294967295"),
    "a seed that is text": (lambda f: dict(image_editor=_editor(f), seed="twelve"), "error",
                            "seed: enter a whole number from 0 to 4294967295 (or click 'new seed'), got 'twelve'"),
    "a parameter that is text": (lambda f: dict(image_editor=_editor(f), controls={"strategies.sams.tau": "a lot"}), "error",
                                 "strategies.sams.tau: enter a number (default 0.1), got 'a lot'"),
    "a switch that is text": (lambda f: dict(image_editor=_editor(f), controls={"strategies.makvs.enabled": "maybe"}), "error",
                              "strategies.makvs.enabled: expected true or false, got 'maybe'"),
    "a parameter out of its range": (lambda f: dict(image_editor=_editor(f), controls={"strategies.sams.tau": 5}), "error",
                                     "strategies.sams: tau must be in [0, 1]"),
    "a million steps": (lambda f: dict(image_editor=_editor(f), controls={"sampler.steps": 10**6}), "error",
                        "sampler.steps: enter a number from 1 to 1000, got 1000000"),
    "strength 0": (lambda f: dict(image_editor=_editor(f), controls={"sampler.strength": 0}), "error",
                   "sampler.strength: enter a number above 0.0, at most 1.0, got 0"),
    "a prompt of 10,000 characters": (lambda f: dict(image_editor=_editor(f), prompt="owl " * 2500), "error",
                                      "prompt is 10,000 characters long; the text encoder reads only its first 77 "
                                      "tokens"),
    "a prompt longer than the text encoder's window": (lambda f: dict(image_editor=_editor(f), prompt="owl " * 120),
                                                      "done", "the text encoder reads the first 77"),
    "control characters in the prompt": (lambda f: dict(image_editor=_editor(f), prompt="a \x1b[31mred\x1b[0m owl"),
                                         "error", "prompt holds the control character U+001B at position 3"),
    "an empty prompt where the steer loss needs one": (lambda f: dict(image_editor=_editor(f), prompt="   "), "error",
                                                       "empty prompt: harmonpaint steers the prompt's own tokens"),
    "a recipe that does not exist": (lambda f: dict(image_editor=_editor(f), recipe="harmonpaint-extreme"), "error",
                                     "recipe 'harmonpaint-extreme' is not offered here; pick one of harmonpaint,"),
    "a recipe given as a path": (lambda f: dict(image_editor=_editor(f), recipe="/etc/passwd"), "error",
                                 "recipe '/etc/passwd' is not offered here"),
    "a compare mode that does not exist": (lambda f: dict(image_editor=_editor(f), compare_mode="all"), "error",
                                           "unknown compare mode 'all'; use one of stock, one_off, single"),
    "a strategy to switch off that the recipe lacks": (
        lambda f: dict(image_editor=_editor(f), compare_mode="one_off", off_instance="nonsense"), "error",
        "needs the strategy to switch off in B; pick one of the enabled ones (sams, steer, makvs, phases)"),
}


def _file(path):
    from gradio_client import handle_file

    return handle_file(str(path))


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_a_message_on_the_page(name, client, api, files, server):
    build, outcome, text = BAD_INPUTS[name]
    values = {"prompt": "a small owl", "seed": 7, **build(files)}
    result = _run(client, api, **values)
    status = status_text(result)
    assert f"attnctl-{outcome}" in str(result[4]), status
    assert text in status, status
    assert "Traceback" not in status and "internal error" not in status
    assert server.process.poll() is None


def test_a_unicode_prompt_runs_and_is_recorded_as_typed(client, api, files):
    prompt = "一只小猫头鹰 🦉, café au lait — «vert»"
    result = _run(client, api, image_editor=_editor(files), prompt=prompt, seed=9)
    assert "attnctl-done" in str(result[4]), status_text(result)
    sidecar = next(Path(p) for p in result[3] if p.endswith("_B-harmonpaint.json"))
    assert json.loads(sidecar.read_text(encoding="utf-8"))["prompt"] == prompt


def test_an_upload_over_the_limit_is_refused_by_gradio(client, api, files, server):
    # gradio_client reads the limit from the page and refuses before sending ...
    with pytest.raises(ValueError, match="exceeds the maximum file size of 20971520 bytes"):
        _run(client, api, image_editor=_editor(files, "huge-upload"))
    # ... and a client that sends anyway is refused by the server
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"huge.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + files["huge-upload"].read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(server.url + "gradio_api/upload", body,
                                      {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    assert status == 413 and "maximum" in text.lower(), (status, text)
    assert server.process.poll() is None


def test_a_huge_image_is_refused_without_being_decoded(client, api, files, server):
    """Decoding the 12000x12000 PNG would take 144 MB as grey and 576 MB as RGBA."""
    process = psutil.Process(server.process.pid)
    before = process.memory_info().rss
    result = _run(client, api, image_editor=_editor(files, "bomb"), prompt="an owl", seed=3)
    assert "image is too large (12000x12000" in status_text(result)
    assert process.memory_info().rss - before < 100 * 2**20


def test_after_every_bad_input_the_server_still_makes_the_right_image(client, api, files, server, app_api_pipe):
    import harmonpaint_recipe as hp

    case = files["case"]
    result = _run(client, api, image_editor=_editor(files), prompt=case.prompt, seed=case.seed,
                  compare_mode="single")
    assert "attnctl-done" in str(result[4]), status_text(result)
    expected = hp.inpaint(case.image, case.mask, case.prompt, recipe=hp.load_recipe("harmonpaint", TINY), pipe=app_api_pipe,
                          seed=case.seed)
    got = next(Path(p) for p in result[3] if p.endswith("_B-harmonpaint.png")).read_bytes()
    assert sha256(got) == sha256(png_bytes(expected))
    check_folder(server.out_dir)  # the refused requests left nothing half-written
    assert server.process.poll() is None


# exposure ---------------------------------------------------------------------------------

def test_the_server_listens_on_loopback_only(server, api):
    process = psutil.Process(server.process.pid)
    listening = [c.laddr.ip for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and all(ip in ("127.0.0.1", "::1") for ip in listening), listening


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_only_files_of_the_output_folder_can_be_read(server, client, api, files):
    result = _run(client, api, image_editor=_editor(files), prompt="an owl", seed=21, compare_mode="single")
    output = next(p for p in (server.out_dir).glob("*seed21/*_B-harmonpaint.png"))
    assert _get(f"{server.url}gradio_api/file={output}") == 200  # outputs are readable: the warning says so
    outside = [Path("/etc/passwd"), server.log_path, server.root / "gradio-cache", Path(__file__),
               server.out_dir / ".." / "server.log", server.out_dir / ".attnctl-app.lock" / ".." / ".." / "server.log"]
    for path in outside:
        assert _get(f"{server.url}gradio_api/file={path}") in (403, 404), path
    assert status_text(result)


def _raw_run(server, api, data) -> list[dict]:
    """A request made by hand (not through gradio_client): the events the queue sends back."""
    session = uuid.uuid4().hex
    run_index = next(i for i, d in enumerate(json.load(urllib.request.urlopen(server.url + "config"))["dependencies"])
                     if d.get("api_name") == "run")
    body = json.dumps({"data": data, "fn_index": run_index, "session_hash": session, "event_data": None,
                       "trigger_id": None}).encode()
    request = urllib.request.Request(server.url + "gradio_api/queue/join", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    events = []
    with urllib.request.urlopen(f"{server.url}gradio_api/queue/data?session_hash={session}", timeout=120) as stream:
        for line in stream:
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                events.append(event)
                if event.get("msg") in ("process_completed", "close_stream"):
                    break
    return events


def test_a_request_cannot_point_the_server_at_its_own_files(server, api):
    before = sorted(p.name for p in server.out_dir.iterdir())
    secret = {"path": "/etc/passwd", "orig_name": "passwd.png", "meta": {"_type": "gradio.FileData"}}
    data = api.args(image_editor={"background": secret, "layers": [], "composite": None, "id": None},
                    prompt="an owl", seed=5)
    events = _raw_run(server, api, data)
    completed = [e for e in events if e.get("msg") == "process_completed"]
    assert completed and completed[-1]["success"] is False, events
    assert sorted(p.name for p in server.out_dir.iterdir()) == before  # no run was made from it
    cached = [p for p in (server.root / "gradio-cache").rglob("*") if p.is_file()]
    assert not any(p.read_bytes() == Path("/etc/passwd").read_bytes() for p in cached)


def test_the_api_takes_no_path_override_or_model_choice(server, api):
    config = json.load(urllib.request.urlopen(server.url + "config"))
    components = {c["id"]: c for c in config["components"]}
    taken = {(components[i]["type"], components[i]["props"].get("elem_id"))
             for d in config["dependencies"] for i in d["inputs"]}
    texts = {elem for kind, elem in taken if kind in ("textbox", "code", "file", "uploadbutton", "json")}
    assert texts == {"prompt"}  # the only free text a request carries; files come in as images only
    assert {kind for kind, _ in taken} <= {"imageeditor", "image", "dropdown", "radio", "textbox", "number",
                                           "checkbox", "state"}
    recipe = next(c for c in config["components"] if c["props"].get("elem_id") == "recipe")
    assert all("/" not in value for _, value in recipe["props"]["choices"])  # names, no paths
    assert not any("model" in str(elem) or "override" in str(elem) for _, elem in taken)
