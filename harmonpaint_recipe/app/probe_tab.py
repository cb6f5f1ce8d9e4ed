"""The page's "Probes" tab: the probe pictures of the last run (a ``page.TabBuilder``).

Probes are switched on when the app starts (``attnctl app --probes cross_maps,curves``, or
``probes.NAME.enabled=true`` overrides); every run then measures, and this tab draws what
the last run's configurations measured, side by side (A and B of the compare mode).
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from harmonpaint_recipe.app.service import RunOutput
from harmonpaint_recipe.probing.render import pictures

NO_PROBES = ("No probe measured the last run. Start the app with probes on, e.g. "
             "`attnctl app --probes cross_maps,curves` (the self-attention PCA, `self_pca`, costs more), "
             "then run again. See docs/probes.md for how to read the pictures.")
NO_RUN = "No run yet: make one in the Inpaint tab, then come back."


def probe_gallery(output: RunOutput | None) -> tuple[list[tuple[Image.Image, str]], str]:
    """(picture, caption) for each probe picture of ``output``, and a status line."""
    if output is None:
        return [], NO_RUN
    runs = [o.probe_run for o in output.outputs if o.probe_run is not None]
    if not runs:
        return [], NO_PROBES
    drawn = pictures(runs)
    labels = ", ".join(run.label for run in runs)
    return [(image, name) for name, image in drawn.items()], f"Probes of the run in {output.run_dir} ({labels})."


def probe_tab(last_run: Any) -> None:
    """Build the tab inside the page's tab set; ``last_run`` is the page's ``gr.State`` of the last ``RunOutput``."""
    with gr.Tab("Probes", id="probes"):
        gr.Markdown("Attention probes of the last run: cross-attention maps per prompt token, self-attention "
                    "PCA, per-step curves (see docs/probes.md).")
        show = gr.Button("Show the probes of the last run", elem_id="show-probes")
        status = gr.Markdown(elem_id="probe-status")
        gallery = gr.Gallery(label="Probe pictures", columns=1, height="auto", elem_id="probe-gallery")
        show.click(probe_gallery, [last_run], [gallery, status])
