"""``torch.compile`` of the UNet with attnctl attached: graphs, graph breaks and recompilations,
counted (not timed), for every shipped SD recipe (``harmonpaint-sdxl`` on the tiny SDXL model
takes over a minute to trace; its counts are measured by ``scripts/compile-counts.py`` for
docs/benchmarks.md).

Compiled as docs/benchmarks.md says (``pipe.unet.forward = torch.compile(pipe.unet.forward)``,
so attnctl's hooks stay eager), whole 6-step runs through ``Runner``, dynamo's ``eager``
backend (the graph capture without code generation), measured by
``harmonpaint_recipe.bench.compile_counts``. The controls: stock diffusers (one graph), and a
strategy that reads the step index as a Python number inside the attention call, which the
measurement must catch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

import attnctl
from attnctl import ReweightOp, StrategySpec, select_sites
from harmonpaint_recipe.bench.compile_counts import graphs_needed, measure_recipe, phase_keys, prompt_for
from harmonpaint_recipe.loading import recipe_names

pytestmark = pytest.mark.slow

#: graphs of a 6-step run: one per set of active ops (phase) and grad mode, none per step
GRAPHS = {
    "sdi": 1,                      # idle: the stock graph with pass-through processors
    "style-aligned": 1,            # every step alike
    "harmonpaint": 3,              # SAMS phase; its steer pass (grad); MAKVS phase
    "harmonpaint-masked-step": 3,
    "harmonpaint-natural": 3,
    "harmonpaint-sams-steer": 3,
    "harmonpaint-sams": 2,         # SAMS phase; after it (no op left)
    "masactrl": 2,                 # before start_step (nothing active); mutual self-attention
    "masactrl-real": 3,            # as masactrl, and the inversion's calls (another batch size)
    "style-aligned-real": 2,       # every step alike; the inversion's calls
    "p2p-replace": 2,              # self maps replaced (first 40 % of the steps); after
    "p2p-refine": 2,
    "p2p-reweight": 2,
    "attend-excite": 2,            # main pass; the gradient pass on the latent
    "pag": 1,                      # a perturbed row, every step alike
    "seg": 1,
    "reference-only": 1,           # a re-noised reference row, every step alike
    "attentive-eraser": 2,         # similarity suppression (steps 0..9); after it
    "visual-style-prompting": 1,   # swapped K/V every step; the early guidance is a step op (outside the graph)
    "hd-painter": 4,               # PAIntA and its RASG gradient pass (t > 500); then plain and the RASG pass
}
#: what a recompilation may be caused by: the grad mode or the set of active ops changed, or the
#: batch's size (an inversion's calls: 1 or 2 rows, before the run's own)
PHASE_GUARDS = ("grad_mode", "state.active", "size mismatch at index 0")


#: compiled here; every other recipe's phases are among theirs (test_the_other_recipes_...)
MEASURED = ("sdi", "harmonpaint", "p2p-replace", "masactrl", "style-aligned", "attend-excite", "pag", "seg",
            "reference-only", "attentive-eraser", "masactrl-real", "hd-painter",
            "visual-style-prompting")


#: recipes for other networks than the tiny SD pipeline these counts run on
OTHER_NETWORKS = ("sdxl", "sd3", "flux")


def test_every_shipped_recipe_is_listed():
    assert sorted(GRAPHS) == sorted(n for n in recipe_names() if not any(k in n for k in OTHER_NETWORKS))


def _check(counts, graphs: int) -> None:
    assert (counts.graph_breaks, counts.frames_left_eager) == (0, 0)
    assert counts.second_run_graphs == 0  # nothing run- or step-specific is baked into a graph
    assert (counts.graphs, counts.recompiles) == (graphs, graphs - 1)
    others = [r for r in counts.recompile_reasons if not any(g in r for g in PHASE_GUARDS)]
    assert not others, others
    assert counts.max_abs_diff < 1e-4  # the compiled image is the eager one


def test_stock_compiles_to_one_graph(tiny_pipe, image_and_mask):
    """The control of the counting: stock diffusers, compiled the same way."""
    from diffusers import DDIMScheduler
    from torch._dynamo.utils import counters

    from harmonpaint_recipe.bench.compiling import compile_unet, dynamo_counts

    image, mask = image_and_mask
    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    torch._dynamo.reset()
    counters.clear()
    compile_unet(tiny_pipe, backend="eager")
    try:
        tiny_pipe(prompt="a cat", image=image, mask_image=mask, num_inference_steps=6, output_type="latent")
        counts = dynamo_counts()
    finally:
        del tiny_pipe.unet.forward
        torch._dynamo.reset()
    assert (counts["graphs"], counts["graph_breaks"]) == (1, 0)


@pytest.mark.parametrize("recipe", MEASURED)
def test_recipe_compiles_once_per_phase(recipe, tiny_pipe, image_and_mask):
    prompt, overrides = prompt_for(recipe)
    counts = measure_recipe(tiny_pipe, recipe, prompt, *image_and_mask, steps=6, overrides=overrides)
    _check(counts, GRAPHS[recipe])


def test_the_other_recipes_need_no_graph_the_measured_ones_did_not_compile(tiny_pipe):
    """Found without compiling (``phase_keys``): per step, the op classes active at each site in
    the main pass and in the gradient pass. Every recipe needs as many graphs as ``GRAPHS`` says,
    and the recipes not compiled above go through no phase that the compiled ones did not."""
    keys = {name: phase_keys(tiny_pipe, name, 6, prompt_for(name)[1]) for name in GRAPHS}
    assert {name: graphs_needed(k) for name, k in keys.items()} == GRAPHS
    compiled = {part for name in MEASURED for step in keys[name] for part in step if part is not None}
    for name in set(GRAPHS) - set(MEASURED):
        unseen = [part for step in keys[name] for part in step if part is not None and part not in compiled]
        assert not unseen, name


# -- the control: a strategy that bakes the step into the graph must be caught ------------------------------


@dataclass
class StepScaleParams:
    sites: str = field(default="self", metadata={"help": "sites"})


@dataclass(eq=False)
class StepScale(ReweightOp):
    """Scales the output by 1 + step/100, reading ``state.step_index`` inside the attention call."""

    def factors(self, call):
        one = call.query.new_ones(1, 1, 1, 1)
        return [(one, one * (1 + call.state.step_index / 100))]


class StepScalePlugin:
    @attnctl.hookimpl
    def attnctl_add_strategies(self):
        return [StrategySpec("toy_step_scale", "reads the step index in the call", StepScaleParams)]

    @attnctl.hookimpl
    def attnctl_plan(self, instance, spec, params, sites):
        if spec.name != "toy_step_scale":
            return None
        return [StepScale(instance, site=s) for s in select_sites(params.sites, sites)]


def test_the_counts_catch_a_step_baked_into_the_graph(tiny_pipe, image_and_mask):
    from attnctl.plugins import StrategyManager
    from harmonpaint_recipe.loading import load_recipe

    manager = StrategyManager(plugins=[StepScalePlugin()])
    config = load_recipe("sdi", ["strategies={toy: {strategy: toy_step_scale}}"], manager)
    counts = measure_recipe(tiny_pipe, config, "a cat", *image_and_mask, steps=2, manager=manager)
    assert counts.graph_breaks == 0
    assert counts.recompiles >= 1
    assert any("step_index" in r for r in counts.recompile_reasons), counts.recompile_reasons
    with pytest.raises(AssertionError):
        _check(counts, counts.graphs)
