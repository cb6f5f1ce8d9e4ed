"""The Gradio page: image editor with a mask brush, prompt, recipe, generated strategy
controls, compare mode, seed, side-by-side results and downloads.

Only this module and ``server.py`` import Gradio. The page's logic lives in
``AppService`` (runs), ``controls`` (generated controls), ``compare`` (modes) and
``editor`` (image and mask); the event handlers here only translate between them and
the components.

More tabs: ``build_page(service, extra_tabs=[...])`` calls each ``TabBuilder`` inside the
page's tab set after the inpaint tab, with the ``gr.State`` that holds the last
``RunOutput`` (or ``None``), so a view of the last run can be added without touching
this module.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import gradio as gr

from harmonpaint_recipe.app import components as ui
from harmonpaint_recipe.app.compare import DEFAULT_MODE, MODES, enabled_instances
from harmonpaint_recipe.app.controls import ParamControl, changed_values, override_strings
from harmonpaint_recipe.app.editor import editor_inputs
from harmonpaint_recipe.app.messages import done_html, error_html
from harmonpaint_recipe.app.service import AppService, RunOutput, RunRequest
from harmonpaint_recipe.loading import resolved, to_yaml
from harmonpaint_recipe.runner import new_seed

TabBuilder = Callable[[gr.State], None]
#: brush colour: white on the photo reads as "this goes away"; only the stroke's alpha is used
BRUSH_COLOR = "#ffffff"
PAGE_CSS = """
.attnctl-status { padding: 8px 12px; border-radius: 6px; }
.attnctl-error { color: #9b1c1c; background: #fde8e8; border-left: 4px solid #9b1c1c; }
.attnctl-done { color: #03543f; background: #def7ec; border-left: 4px solid #03543f; }
"""
INTRO = """### attnctl: inpaint, switch strategies, compare
1. Upload an image and paint the region to inpaint with the brush (or upload a mask).
2. Type the prompt, pick a recipe, change strategy settings or switch strategies off.
3. Run: both configurations of the compare mode use the same seed; every output comes with
   its sidecar JSON, which `attnctl inpaint --from FILE.json` turns into the same image."""


def _plain(text: str) -> str:
    """``text`` with Markdown's special characters escaped (summaries hold equations)."""
    return re.sub(r"([\\`*_{}\[\]()#+!|~<>^-])", r"\\\1", text)


def _number_step(control: ParamControl) -> float:
    """A spinner step of about a tenth of the default's magnitude."""
    if control.kind is int:
        return 1
    magnitude = abs(float(control.default or 0.0))
    return 10.0 ** (math.floor(math.log10(magnitude)) - 1) if magnitude > 0 else 0.01


def _component(control: ParamControl, value: Any, elem_prefix: str) -> gr.components.Component:
    elem_id = f"{elem_prefix}-{control.key.replace('.', '-')}"
    if control.kind is bool:
        label = f"{control.instance} on" if control.name == "enabled" and control.instance else control.name
        return gr.Checkbox(value=bool(value), label=label, info=control.info, elem_id=elem_id)
    return ui.Number(value=value, label=control.name, info=control.info, elem_id=elem_id,
                     precision=0 if control.kind is int else None, step=_number_step(control))


def _off_choices(recipe: dict, current: str | None) -> tuple[list[str], str | None]:
    """Instances B can switch off, and which one is picked (the current one if still on)."""
    enabled = enabled_instances(recipe)
    return enabled, current if current in enabled else (enabled[0] if enabled else None)


class Page:
    """The components of one page and their event handlers (bound to one ``AppService``)."""

    def __init__(self, service: AppService, extra_tabs: Sequence[TabBuilder] = ()):
        self.service = service
        self.controls = service.controls
        start = resolved(service.recipe(service.recipe_name))
        # uploads and served copies older than an hour leave Gradio's cache (checked every hour)
        with gr.Blocks(title="attnctl app", delete_cache=(3600, 3600)) as self.blocks:
            self.last_run = gr.State(None)
            gr.Markdown(INTRO)
            gr.Markdown(f"Model: `{service.model_label}`, loaded once; requests run one at a time.",
                        elem_id="model-line")
            with gr.Tabs():
                with gr.Tab("Inpaint", id="inpaint"):
                    self._inpaint_tab(start)
                for build_tab in extra_tabs:
                    build_tab(self.last_run)
            self._wire()

    # layout ---------------------------------------------------------------------------

    def _inpaint_tab(self, start: dict) -> None:
        service = self.service
        with gr.Row():
            with gr.Column(scale=3):
                self.editor = ui.ImageEditor(
                    label="Image: paint the region to inpaint", type="pil", image_mode="RGBA", format="png",
                    sources=("upload", "clipboard"), transforms=(), layers=False, elem_id="image-editor",
                    brush=gr.Brush(colors=[BRUSH_COLOR], default_color=BRUSH_COLOR, color_mode="fixed"),
                )
                with gr.Accordion("Upload a mask (white = inpaint; added to the brush strokes)", open=False):
                    self.mask_upload = ui.ImageInput(label="Mask", type="pil", image_mode="L", sources=("upload",),
                                                     elem_id="mask-upload")
            with gr.Column(scale=2):
                self.prompt = gr.Textbox(label="Prompt", placeholder="what to paint into the region, e.g. a small owl",
                                         elem_id="prompt")
                self.recipe = ui.Dropdown(choices=service.recipe_choices, value=service.recipe_name, label="Recipe",
                                          elem_id="recipe")
                self.mode = ui.Radio(choices=[(label, key) for key, label in MODES.items()], value=DEFAULT_MODE,
                                     label="Compare", elem_id="compare-mode")
                choices, value = _off_choices(start, None)
                self.off = ui.Dropdown(choices=choices, value=value, label="Strategy switched off in B",
                                       visible=False, elem_id="off-instance")
                with gr.Row():
                    self.seed = ui.Number(value=new_seed, label="Seed", precision=0, elem_id="seed", scale=3)
                    self.new_seed = gr.Button("new seed", elem_id="new-seed", scale=1)
                self.run_button = gr.Button("Run", variant="primary", elem_id="run")
                self.status = gr.HTML(elem_id="status")
        with gr.Row():
            self.out_a = gr.Image(label="A", type="filepath", format="png", interactive=False, elem_id="output-a")
            self.out_b = gr.Image(label="B", type="filepath", format="png", interactive=False, elem_id="output-b")
        self.slider = gr.ImageSlider(label="Swipe between A and B", type="filepath", format="png",
                                     interactive=False, elem_id="slider")
        self.downloads = gr.File(label="Downloads: each output with its sidecar JSON, then the mask and the input",
                                 file_count="multiple", interactive=False, elem_id="downloads")
        self.components: list[gr.components.Component] = []
        self.groups: list[gr.Group] = []
        with gr.Accordion("Sampler", open=False):
            for control in service.sampler_controls:
                self.components.append(_component(control, control.read(start), "ctl"))
        with gr.Accordion("Output: paste the input back outside the mask", open=True):
            for control in service.output_controls:
                self.components.append(_component(control, control.read(start), "ctl"))
        with gr.Accordion("Strategies (from each strategy's parameter dataclass)", open=True):
            for group in service.groups:
                present = group.enabled.applies_to(start)
                with gr.Group(visible=present) as box:
                    gr.Markdown(f"**{group.instance}**: `{group.strategy}`, {_plain(group.summary)}")
                    for control in group.controls:
                        self.components.append(_component(control, control.read(start), "ctl"))
                self.groups.append(box)
        with gr.Accordion("Effective recipe and command line", open=True):
            self.yaml = gr.Code(label="Recipe B as YAML (save as my.yaml: attnctl inpaint --recipe my.yaml ...)",
                                language="yaml", interactive=False, elem_id="recipe-yaml")
            self.cli = gr.Code(label="Command line", language="shell", interactive=False, elem_id="cli")

    # events ---------------------------------------------------------------------------

    def _wire(self) -> None:
        view = [self.yaml, self.cli, self.off, self.status]
        form = [self.recipe, self.mode, self.off, self.prompt, self.seed, *self.components]
        self.recipe.input(self.pick_recipe, form, [*self.groups, *self.components, *view])
        for component in [self.mode, self.off, self.prompt, self.seed, *self.components]:
            component.input(self.describe, form, view)
        self.new_seed.click(lambda: new_seed(), None, self.seed)
        self.blocks.load(self.describe, form, view)
        self.run_button.click(
            self.run, [self.editor, self.mask_upload, *form],
            [self.out_a, self.out_b, self.slider, self.downloads, self.status, self.cli, self.last_run],
            concurrency_limit=1, concurrency_id="pipeline", show_progress_on=[self.out_a, self.out_b], api_name="run",
        )

    def _changes(self, name: str, values: Sequence[Any]) -> dict[str, Any]:
        """Page values that differ from recipe ``name``'s own."""
        return changed_values(resolved(self.service.recipe(name)), self.controls, [ui.plain(v) for v in values])

    def pick_recipe(self, name, mode, off, prompt, seed, *values):
        """A new recipe: show its groups and load its values into the controls."""
        name, mode, off, seed = (ui.plain(v) for v in (name, mode, off, seed))
        try:
            recipe = resolved(self.service.recipe(name))
        except Exception as exc:  # a recipe not offered (only a hand-made request sends one)
            return [*[gr.update()] * (len(self.service.groups) + len(self.controls) + 3), error_html(exc)]
        shown = [gr.update(visible=g.enabled.applies_to(recipe)) for g in self.service.groups]
        loaded = [gr.update(value=c.read(recipe)) if c.applies_to(recipe) else gr.update() for c in self.controls]
        fresh = [c.read(recipe) if c.applies_to(recipe) else v for c, v in zip(self.controls, values)]
        return [*shown, *loaded, *self.describe(name, mode, off, prompt, seed, *fresh)]

    def describe(self, name, mode, off, prompt, seed, *values):
        """YAML and command line of the effective recipe, or the error that stops it."""
        name, mode, off, seed = (ui.plain(v) for v in (name, mode, off, seed))
        try:
            cfg, overrides = self.service.effective_recipe(name, self._changes(name, values))
        except Exception as exc:  # shown in the status box; the YAML keeps its last valid state
            return gr.update(), gr.update(), gr.update(), error_html(exc)
        choices, value = _off_choices(resolved(cfg), off)
        line = self.service.command(name, overrides, "IMAGE.png", "MASK.png", prompt or "PROMPT",
                                    seed if seed is not None else "SEED", "out.png")
        return to_yaml(cfg), line, gr.update(choices=choices, value=value, visible=mode == "one_off"), ""

    def run(self, editor, mask, name, mode, off, prompt, seed, *values, progress=gr.Progress()):
        """Run the compare mode; results, downloads and a status line, or an error in the page."""
        keep = [gr.update()] * 3
        name, mode, off, seed = (ui.plain(v) for v in (name, mode, off, seed))
        try:
            request = RunRequest(editor_inputs(editor, mask), prompt, seed, name,
                                 self._changes(name, values), mode, off)
            result = self.service.run(request, lambda fraction, text: progress(fraction, desc=text))
        except Exception as exc:
            return [*keep, gr.update(), error_html(exc), gr.update(), gr.update()]
        return [*self._show(result, override_strings(request.changes)), result]

    def _show(self, result: RunOutput, changes: Sequence[str]) -> list[Any]:
        by_slot = {o.variant.slot: o for o in result.outputs}
        images = [gr.update(value=str(by_slot[s].image_path), label=f"{s}: {by_slot[s].variant.label}")
                  if s in by_slot else gr.update(value=None, label=s) for s in ("A", "B")]
        pair = (str(by_slot["A"].image_path), str(by_slot["B"].image_path)) if len(by_slot) == 2 else None
        labels = ", ".join(f"{o.variant.slot} {o.variant.label}" for o in result.outputs)
        edited = f" (edited on the page: {' '.join(changes)})" if changes else ""
        summary = f"Done in {result.seconds:.1f} s, seed {result.seed}: {labels}{edited}. Files in {result.run_dir}"
        commands = "\n".join(f"# {o.variant.slot}: {o.variant.label}\n{o.command}\n"
                             f"attnctl inpaint --from {o.sidecar_path}" for o in result.outputs)
        return [*images, pair, [str(p) for p in result.files()], done_html(summary, result.notes), commands]


def build_page(service: AppService, extra_tabs: Sequence[TabBuilder] = ()) -> gr.Blocks:
    """The page for ``service``; ``extra_tabs`` add tabs that read the last run."""
    return Page(service, extra_tabs).blocks
