"""Start the page: claim the output folder, load the model once, build the page, serve it with
a queue, and stop cleanly.

Ctrl+C or SIGTERM stops the server: no new run starts, the run in progress ends at its next
denoising step (the outputs it finished stay, each with its sidecar), then the process exits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence
from contextlib import contextmanager

from attnctl.errors import InputError
from harmonpaint_recipe.app.outdir import claim_out_dir

#: the queue runs one pipeline call at a time; more requests wait their turn
CONCURRENCY = 1
#: requests that may wait in the queue; more are refused with Gradio's "queue is full" message
MAX_QUEUE = 64
#: largest upload Gradio accepts (an uncompressed 2048x2048 RGBA PNG is 16 MB)
MAX_UPLOAD = "20mb"
#: how long a stop waits for the run in progress to reach its next step
STOP_WAIT_S = 120.0


def check_address(host: str, port: int) -> None:
    """Fail before the (slow) model load when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # like the server's own socket: a port left in TIME_WAIT by a previous run is usable
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise InputError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); another program may use the port: "
                "pick another with --port, or give an address of this machine with --host"
            ) from None


@contextmanager
def _run_log() -> Iterator[None]:
    """One line per run on stdout (started, done, failed), with the time."""
    logger = logging.getLogger("attnctl.app")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s attnctl app: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, a service manager) stops the server like Ctrl+C does."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (an embedding program): its own rules apply
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(recipe: str, overrides: Sequence[str] = (), host: str = "127.0.0.1", port: int = 7860,
          out_dir: str | Path = "out/app", extra_tabs: Sequence[Callable[[Any], None]] = ()) -> None:
    """Load ``recipe``'s pipeline and serve the page on ``host:port`` until interrupted.

    ``extra_tabs`` are ``page.TabBuilder`` functions: each is called inside the page's tab
    set with the ``gr.State`` holding the last ``RunOutput``.
    """
    check_address(host, port)
    claimed = claim_out_dir(out_dir)
    try:
        with _run_log(), _sigterm_interrupts(), warnings.catch_warnings():
            # the page refuses images above editor.MAX_PIXELS itself, far below PIL's warning
            warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
            _serve(recipe, overrides, host, port, claimed, extra_tabs)
    finally:
        claimed.release()


def _serve(recipe: str, overrides: Sequence[str], host: str, port: int, claimed: Any,
           extra_tabs: Sequence[Callable[[Any], None]]) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline tool
    from harmonpaint_recipe.app.page import PAGE_CSS, build_page
    from harmonpaint_recipe.app.service import AppService

    out = claimed.path
    if claimed.removed:
        print(f"removed {len(claimed.removed)} temporary file(s) that an interrupted server left in {out}", flush=True)
    if claimed.unrecorded:
        print(f"note: {len(claimed.unrecorded)} output image(s) in {out} have no sidecar (a server stopped between "
              f"the two writes), e.g. {claimed.unrecorded[0]}; they cannot be remade with --from", flush=True)
    service = AppService(recipe, overrides, out)
    print(f"model {service.model_label} loaded in {service.load_s:.1f} s; outputs go to {out.resolve()}", flush=True)
    page = build_page(service, extra_tabs)
    page.queue(default_concurrency_limit=CONCURRENCY, max_size=MAX_QUEUE)
    page.launch(server_name=host, server_port=port, share=False, inbrowser=False, css=PAGE_CSS,
                allowed_paths=[str(out.resolve())], max_file_size=MAX_UPLOAD, prevent_thread_lock=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping: no new runs; the run in progress ends at its next step", flush=True)
    finally:
        service.stop()
        idle = service.wait_idle(STOP_WAIT_S)
        page.close(verbose=False)
    print("stopped" if idle else f"stopped after waiting {STOP_WAIT_S:.0f} s for the run in progress", flush=True)
