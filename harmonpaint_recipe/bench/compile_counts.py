"""Graphs, graph breaks and recompilations of ``torch.compile`` with a recipe attached (counted, not timed).

The UNet's forward is compiled as ``attnctl bench --compile`` does (``bench.compiling``), the
recipe is attached through ``Runner`` and a whole run is made twice: the first run compiles
(one graph per set of active ops and grad mode a run goes through), the second must compile
nothing (nothing step- or run-specific is baked into a graph). The output of the compiled run
is compared with an eager run of the same recipe, inputs and seed.

Counted from dynamo's own state, not from logs a user might have switched off:

- ``graphs``: graphs compiled in the first run (``counters["stats"]["unique_graphs"]``);
- ``graph_breaks``: graph breaks (``counters["graph_break"]``);
- ``recompiles``: cache entries of the UNet's forward beyond the first, with the guard that
  failed for each (``recompile_reasons``, dynamo's ``recompiles`` log artifact);
- ``frames_left_eager``: frames dynamo gave up on;
- ``second_run_graphs``: graphs compiled during the second run (0 when nothing recompiles
  across runs or steps).
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from harmonpaint_recipe.bench.compiling import compile_unet, dynamo_counts


@dataclass
class CompileCounts:
    """What compiling the UNet with one recipe attached cost (see the module docstring)."""

    recipe: str
    steps: int
    graphs: int
    graph_breaks: int
    recompiles: int
    frames_left_eager: int
    second_run_graphs: int
    max_abs_diff: float
    recompile_reasons: list[str] = field(default_factory=list)

    def row(self) -> str:
        """One Markdown table row."""
        return (f"| `{self.recipe}` | {self.graphs} | {self.graph_breaks} | {self.recompiles} | "
                f"{self.frames_left_eager} | {self.second_run_graphs} | {self.max_abs_diff:.1e} |")


TABLE_HEAD = ("| recipe | graphs (first run) | graph breaks | recompiles | frames left eager | "
              "graphs in a second run | max abs diff to eager |\n|---|---:|---:|---:|---:|---:|---:|")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def recompile_log() -> Iterator[list[str]]:
    """Collect dynamo's recompilation messages (the failed guards) without printing them."""
    import torch._logging

    logger = torch._logging.getArtifactLogger("torch._dynamo.guards", "recompiles")
    handler = _Collect()
    torch._logging.set_logs(recompiles=True)
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        torch._logging.set_logs()


_GUARD = re.compile(r"^\s*- (\d+/\d+: .*)$")


def _guard_lines(message: str) -> list[str]:
    """The failed guards of one ``Recompiling function ...`` message (first lines; the user
    stack traces dynamo adds below each are left out)."""
    return [m.group(1) for m in map(_GUARD.match, message.splitlines()) if m]


def _forward_entries(unet: Any) -> int:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(type(unet).forward.__code__))


def measure_recipe(pipe: Any, recipe: Any, prompt: str, image: Any, mask: Any, steps: int = 6,
                   overrides: tuple[str, ...] = (), backend: str = "eager", seed: int = 0,
                   manager: Any = None) -> CompileCounts:
    """Compile ``pipe.unet.forward`` with ``recipe`` attached and count (see the module docstring).

    ``recipe`` is a recipe name, path or config (``load_recipe``); ``image`` and ``mask`` are
    PIL images of the pipeline's size; ``overrides`` are recipe overrides
    (``strategies.p2p.source_prompt=...``); ``manager`` a strategy plugin manager (default:
    entry points). The pipeline is left as it was.
    """
    import torch._dynamo
    from torch._dynamo.utils import counters

    from harmonpaint_recipe.inputs import prepare_inputs
    from harmonpaint_recipe.loading import load_recipe
    from harmonpaint_recipe.runner import Runner

    inputs = prepare_inputs(image, mask, warn=False)
    config = load_recipe(recipe, [f"sampler.steps={steps}", *overrides], manager)
    latent = {"output_type": "latent"}

    def one_run(runner: Runner) -> torch.Tensor:
        return runner(inputs, prompt, seed=seed, pipeline_kwargs=latent).image

    with Runner(pipe, config, manager) as runner:
        eager = one_run(runner)
        torch._dynamo.reset()
        counters.clear()
        own_forward = pipe.unet.__dict__.get("forward")
        compile_unet(pipe, backend=backend)
        try:
            with recompile_log() as messages:
                compiled = one_run(runner)
                first = dynamo_counts()
                entries = _forward_entries(pipe.unet)
                one_run(runner)
                second = dynamo_counts()
        finally:
            if own_forward is None:
                del pipe.unet.forward
            else:
                pipe.unet.forward = own_forward
            torch._dynamo.reset()
    reasons = [line for message in messages for line in _guard_lines(message)]
    return CompileCounts(
        recipe=recipe if isinstance(recipe, str) else "(config)", steps=steps, graphs=first["graphs"],
        graph_breaks=first["graph_breaks"],
        recompiles=max(entries - 1, 0), frames_left_eager=first["frames_failed"],
        second_run_graphs=second["graphs"] - first["graphs"],
        max_abs_diff=float((compiled.float() - eager.float()).abs().max()), recompile_reasons=reasons,
    )


#: the prompt and overrides each shipped recipe is measured with (recipes whose defaults need
#: a prompt of a given shape get one that fits them)
RECIPE_PROMPTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "p2p-replace": ("a blue cube", ("strategies.p2p.blend_words=[red,blue]",)),
    "p2p-refine": ("a red cube on a table", ("strategies.p2p.blend_words=[cube,cube]",)),
    "p2p-reweight": ("a red cube", ("strategies.p2p.blend_words=[red,red]",)),
    "masactrl": ("a small owl spreading its wings", ()),
    "style-aligned": ("a cat", ()),
    "attend-excite": ("a cat and a dog", ("strategies.excite.tokens=[2,5]",)),
    "attentive-eraser": ("", ("strategies.erase.ss_steps=2",)),  # the suppression ends inside 6 steps
}


#: the phase of a run's inversion calls (``phase_keys``)
RECORD_KEY = frozenset({("record pass", ())})


def prompt_for(recipe: str) -> tuple[str, tuple[str, ...]]:
    """The prompt and overrides ``recipe`` is measured with (``a cat``, none, by default)."""
    return RECIPE_PROMPTS.get(recipe, ("a cat", ()))


def phase_keys(pipe: Any, recipe: Any, steps: int = 6, overrides: tuple[str, ...] = (),
               manager: Any = None) -> list[tuple]:
    """Per step of a ``steps``-step run, what decides the graphs a compiled forward needs,
    found without compiling: the op classes active at each site in the main pass, and in
    the gradient pass of latent guidance when one runs (``None`` otherwise).

    Two steps with equal keys run the same traced code (up to the ops' parameters), so a run
    needs one graph per distinct main-pass key and one per distinct gradient-pass key. Rows
    that follow a DDIM inversion add a first key, ``RECORD_KEY``: the inversion's UNet calls
    run no op but on a batch of another size.
    """
    from attnctl.layout import BatchLayout
    from attnctl.ops import GUIDANCE, MAIN
    from attnctl.run_state import RunState
    from harmonpaint_recipe.loading import load_recipe
    from harmonpaint_recipe.runner import Runner

    config = load_recipe(recipe, [f"sampler.steps={steps}", *overrides], manager)
    with Runner(pipe, config, manager) as runner:
        pipe.scheduler.set_timesteps(steps)
        timesteps = [float(t) for t in pipe.scheduler.timesteps]
        layout = BatchLayout.for_pipeline(num_prompts=1, cfg=True)
        probe = RunState(runner.controller.plan, layout, timesteps=timesteps)
        inverted = any(spec.driver == "inverted" for _, spec in runner.controller.plan.rows)
        keys = [(RECORD_KEY, None)] if inverted else []
        for t in timesteps:
            probe.begin_step(t, prepare=False)

            def sites(kind: str) -> frozenset:
                return frozenset((site, tuple(type(op).__qualname__ for op in a.all))
                                 for site, a in probe.active_in(kind).items())

            guided = bool(probe.active_latent_ops)
            keys.append((sites(MAIN), sites(GUIDANCE) if guided else None))
    return keys


def graphs_needed(keys: list[tuple]) -> int:
    """Graphs a compiled run with these ``phase_keys`` needs: distinct main-pass keys plus
    distinct gradient-pass keys."""
    return len({main for main, _ in keys}) + len({guided for _, guided in keys if guided is not None})
