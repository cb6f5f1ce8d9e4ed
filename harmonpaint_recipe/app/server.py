"""Start the page: load the model once, build the page, serve it with a queue."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable, Sequence

from attnctl.errors import InputError

#: the queue runs one pipeline call at a time; more requests wait their turn
CONCURRENCY = 1


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


def serve(recipe: str, overrides: Sequence[str] = (), host: str = "127.0.0.1", port: int = 7860,
          out_dir: str | Path = "out/app", extra_tabs: Sequence[Callable[[Any], None]] = ()) -> None:
    """Load ``recipe``'s pipeline and serve the page on ``host:port`` until interrupted.

    ``extra_tabs`` are ``page.TabBuilder`` functions: each is called inside the page's tab
    set with the ``gr.State`` holding the last ``RunOutput``.
    """
    check_address(host, port)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline tool
    from harmonpaint_recipe.app.page import PAGE_CSS, build_page
    from harmonpaint_recipe.app.service import AppService

    out = Path(out_dir)
    service = AppService(recipe, overrides, out)
    print(f"model {service.model_label} loaded in {service.load_s:.1f} s; outputs go to {out.resolve()}", flush=True)
    page = build_page(service, extra_tabs)
    page.queue(default_concurrency_limit=CONCURRENCY)
    page.launch(server_name=host, server_port=port, share=False, inbrowser=False, css=PAGE_CSS,
                allowed_paths=[str(out.resolve())])
