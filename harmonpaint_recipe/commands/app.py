"""``attnctl app``: serve a page to inpaint, switch strategies and compare in a browser.

    attnctl app [--recipe NAME] [key=value ...] [--host 127.0.0.1] [--port 7860] [--out-dir out/app] [--probes LIST]

Needs the ``app`` extra (Gradio): ``pip install -e ".[app]"``.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress

from attnctl.cli import Command
from attnctl.errors import InputError
from attnctl.notices import print_line

INSTALL_HINT = 'pip install -e ".[app]"'


def exposure_warning(host: str, port: int, out_dir: str) -> str | None:
    """What a remote user can do when ``host`` is not a loopback address, or None."""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        local = False
    if local:
        return None
    return (f"--host {host} makes the page reachable from other machines, and it has no login: anyone who can "
            f"reach port {port} can run jobs on this machine's model (queued with yours) and read every input, "
            f"mask, output and sidecar in '{out_dir}'. Use it on a network you trust only; the default, "
            "127.0.0.1, serves this machine alone")


def _run(args: argparse.Namespace) -> int:
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise InputError(f"unexpected argument '{bad[0]}': overrides are key=value (e.g. model.pretrained=tiny)")
    if importlib.util.find_spec("gradio") is None:
        raise InputError(f"attnctl app needs Gradio, which is not installed; install the app extra: {INSTALL_HINT}")
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port} is not a TCP port; give 1..65535 (e.g. 7860)")
    from harmonpaint_recipe.app.probe_tab import probe_tab
    from harmonpaint_recipe.app.server import serve

    overrides = list(args.overrides)
    if args.probes:
        from harmonpaint_recipe.probing.run import probe_overrides

        overrides += probe_overrides(args.probes.split(","))
    warning = exposure_warning(args.host, args.port, args.out_dir)
    if warning:
        print_line(f"attnctl app: warning: {warning}")
    from harmonpaint_recipe.devices import configure_threads
    from harmonpaint_recipe.loading import load_recipe

    configure_threads(args.threads, str(load_recipe(args.recipe, overrides).model.pretrained))
    serve(args.recipe, overrides, args.host, args.port, args.out_dir, extra_tabs=[probe_tab])
    return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="harmonpaint", help="recipe the page starts with (name or YAML path) [harmonpaint]")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1: this machine only]")
    p.add_argument("--port", type=int, default=7860, help="port [7860]")
    p.add_argument("--threads", default="auto",
                   help="CPU threads [auto: OMP_NUM_THREADS if set, 1 for the tiny models, else torch's default]")
    p.add_argument("--out-dir", default="out/app", help="folder for each run's inputs, outputs and sidecars [out/app]")
    p.add_argument("--probes", default=None,
                   help="attention probes to run with every request, e.g. cross_maps,curves (self_pca costs more); "
                        "their pictures are in the Probes tab [none]")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides for every recipe, e.g. model.pretrained=tiny sampler.steps=10")


COMMAND = Command(
    help="web page to inpaint, switch strategies and compare (needs the app extra)",
    description="Load the recipe's pipeline once and serve a page where you upload an image, paint the "
    "mask, type the prompt, pick a recipe, switch strategies and compare two configurations on one seed. "
    f"Needs Gradio: {INSTALL_HINT}.",
    add_arguments=_arguments,
    run=_run,
)
