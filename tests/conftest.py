"""Shared fixtures: a tiny random SD-inpainting pipeline saved to disk and loaded back
through ``from_pretrained``, and a small image/mask pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

# Tiny models are dominated by threading overhead: on a shared 2-core machine one thread is
# many times faster than two. Results do not depend on it (every comparison runs in-process).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory):
    """Folder holding a tiny random inpainting pipeline (safetensors)."""
    from attnctl.testing import save_tiny_inpaint_pipeline

    return save_tiny_inpaint_pipeline(tmp_path_factory.mktemp("tiny-pipe"))


@pytest.fixture
def tiny_pipe(tiny_pipe_dir):
    """A freshly loaded tiny pipeline (CPU, fp32, progress bar off)."""
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(tiny_pipe_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def image_and_mask():
    """A 64x64 random RGB image and a binary mask with a 32x24 masked box."""
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 20:44] = 255
    return image, Image.fromarray(mask)


@pytest.fixture
def files(tmp_path, image_and_mask):
    """A folder holding ``img.png`` and ``mask.png`` (the ``image_and_mask`` pair), for command-line tests."""
    image, mask = image_and_mask
    image.save(tmp_path / "img.png")
    mask.save(tmp_path / "mask.png")
    return tmp_path


@pytest.fixture
def seeded():
    """A function returning a fresh CPU generator with a fixed seed."""
    return lambda seed=0: torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def served_app(tmp_path_factory):
    """One ``attnctl app`` server on a free loopback port with the tiny model, shared by the tests
    that talk to a running page (``app_server.AppServer``; call ``wait_until_serving()`` first)."""
    pytest.importorskip("gradio", reason='the app tests need Gradio: pip install -e ".[test]"')
    from app_server import make_server

    app = make_server(tmp_path_factory.mktemp("served-app")).start()
    try:
        yield app
    finally:
        app.stop()


@pytest.fixture(scope="session")
def app_api_pipe(served_app):
    """The Python API's tiny pipeline (the served app's model), built while the app starts."""
    import harmonpaint_recipe as hp
    from app_server import TINY

    pipe = hp.load_pipeline(hp.load_recipe("harmonpaint", TINY))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def no_network(monkeypatch):
    """Every network connection refused (``OSError``); the attempted addresses are counted in the list returned."""
    import socket

    attempts = []

    def refuse(address, *args, **kwargs):
        attempts.append(address)
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
    return attempts
