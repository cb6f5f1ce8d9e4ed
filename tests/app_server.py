"""A real ``attnctl app`` server for the tests: start it on a free loopback port, wait until it
answers, talk to its page's API the way a client does (``gradio_client``), read its log, stop it.

The run endpoint's arguments are taken from the served page itself (``/config``): the inputs of
the event named ``run``, in order, each with its element id and default value, so a request is
written as ``{"prompt": ..., "ctl-strategies-sams-tau": 0.2}`` and the rest keep the page's
defaults, as in a browser.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TINY = ["model.pretrained=tiny", "sampler.steps=3"]
STARTUP_S = 180  # model build + Gradio import on 2 busy cores
ALL_OFF = [f"strategies.{name}.enabled=false" for name in ("sams", "steer", "makvs", "phases")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AppServer:
    """One ``attnctl app`` process."""

    root: Path
    out_dir: Path
    port: int
    args: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> AppServer:
        self.starts += 1
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "attnctl", "app", "--host", "127.0.0.1", "--port", str(self.port),
             "--out-dir", str(self.out_dir), *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, stdin=subprocess.DEVNULL,
        )
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"attnctl app exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"attnctl app did not answer in {STARTUP_S} s:\n{self.log()}")
            time.sleep(0.3)

    def wait_for_log(self, pattern: str, timeout: float = 120) -> re.Match:
        """The first match of ``pattern`` in the log, waiting for it to appear."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.log())
            if found:
                return found
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"'{pattern}' not in the server log:\n{self.log()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"attnctl app did not stop in {timeout} s after signal {sig}:\n{self.log()}")

    def runs_started(self) -> list[int]:
        """Seeds of the runs in the order the server started them (its log)."""
        return [int(s) for s in re.findall(r"run \d+ started: seed (\d+)", self.log())]


def make_server(root: Path, args: list[str] | None = None, env: dict[str, str] | None = None,
                out_dir: Path | None = None, port: int | None = None) -> AppServer:
    root.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(root / "gradio-cache"),
                "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    return AppServer(root, out_dir or root / "runs", port or free_port(), list(args or TINY), full_env,
                     root / "server.log")


class RunApi:
    """The page's ``run`` endpoint as the served page describes it."""

    def __init__(self, url: str):
        with urllib.request.urlopen(url + "config", timeout=30) as response:
            config = json.load(response)
        components = {c["id"]: c for c in config["components"]}
        run = next(d for d in config["dependencies"] if d.get("api_name") == "run")
        self.inputs = [(components[i]["props"].get("elem_id"), components[i]["type"]) for i in run["inputs"]]
        self.defaults = {elem: components[i]["props"].get("value") for (elem, _), i in zip(self.inputs, run["inputs"])}
        self.url = url

    def args(self, controls: dict[str, Any] | None = None, **values: Any) -> list[Any]:
        """Positional arguments of a run; everything not given keeps the page's default.

        Args:
            controls: generated controls by recipe key, e.g. ``{"strategies.sams.tau": 0.2}``.
            values: the page's own inputs by element id, ``-`` written ``_`` (``image_editor``, ``prompt``,
                ``seed``, ``recipe``, ``compare_mode``, ``off_instance``, ``mask_upload``).
        """
        given = {key.replace("_", "-"): value for key, value in values.items()}
        given.update({"ctl-" + key.replace(".", "-"): value for key, value in (controls or {}).items()})
        unknown = set(given) - {elem for elem, _ in self.inputs}
        if unknown:
            raise KeyError(f"the run endpoint has no input {sorted(unknown)}")
        return [given.get(elem, self.defaults[elem]) for elem, _ in self.inputs]

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False, download_files=True)


def editor_value(image: Path, layer: Path | None) -> dict[str, Any]:
    """What the image editor sends: the background and one brush layer."""
    from gradio_client import handle_file

    return {"background": handle_file(str(image)), "layers": [handle_file(str(layer))] if layer else [],
            "composite": None, "id": None}


@dataclass
class ClientCase:
    """One client's own inputs: image, brush stroke, prompt and seed, and what the app must return."""

    name: str
    image: Path
    layer: Path
    prompt: str
    seed: int
    edits: dict[str, Any] = field(default_factory=dict)  # recipe key -> value, set on the page
    overrides: list[str] = field(default_factory=list)  # the same edits as recipe overrides

    @property
    def mask(self) -> Image.Image:
        alpha = np.asarray(Image.open(self.layer).convert("RGBA"))[..., 3] > 0
        return Image.fromarray(alpha.astype(np.uint8) * 255)


def make_case(folder: Path, index: int, size: int = 64) -> ClientCase:
    """Client ``index``: its own random image, its own stroke box, prompt and seed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(100 + index)
    image = folder / f"client{index}.png"
    Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")).save(image)
    layer = np.zeros((size, size, 4), dtype=np.uint8)
    x0, y0 = 4 + 4 * index % 24, 8 + 3 * index % 20
    layer[y0:y0 + 24, x0:x0 + 28] = (255, 255, 255, 255)
    layer_path = folder / f"client{index}-stroke.png"
    Image.fromarray(layer, "RGBA").save(layer_path)
    return ClientCase(f"client{index}", image, layer_path, f"a small owl number {index}", 1000 + 17 * index)


def png_bytes(image: Image.Image) -> bytes:
    """The PNG the app writes for ``image`` (the same encoder settings as files.atomic_save_image)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def status_text(result: Any) -> str:
    """The status box's text of a run's result (its HTML, tags dropped)."""
    html_text = result[4] if isinstance(result, (list, tuple)) else str(result)
    return html.unescape(re.sub(r"<[^>]+>", " ", str(html_text)))


def finished_outputs(out_dir: Path) -> list[Path]:
    """Every output image of every run folder."""
    return sorted(p for pattern in ("*/*_A-*.png", "*/*_B-*.png") for p in out_dir.glob(pattern))


def check_folder(out_dir: Path) -> dict[str, int]:
    """Nothing half-written, and every output image has a sidecar recording its exact bytes."""
    leftovers = sorted(str(p) for p in out_dir.rglob("*.tmp"))
    assert leftovers == [], f"temporary files left: {leftovers}"
    outputs = finished_outputs(out_dir)
    for image in outputs:
        sidecar = image.with_suffix(".json")
        assert sidecar.is_file(), f"{image} has no sidecar"
        record = json.loads(sidecar.read_text())
        assert record["output"]["sha256"] == sha256(image.read_bytes()), f"{sidecar} does not record {image}"
    return {"runs": len([p for p in out_dir.iterdir() if p.is_dir()]), "outputs": len(outputs)}
