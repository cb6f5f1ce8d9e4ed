"""Step ops (``attnctl.step_ops``) on the tiny pipeline: prediction, post-step and noise ops.

The strongest check is perturbed-attention guidance written as a plugin from the engine's
parts (a ``shared`` conditional row, an identity branch at the mid block, a prediction op)
against diffusers' own ``StableDiffusionPAGInpaintPipeline``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

import attnctl
from attnctl import Branch, BranchOp, NoiseOp, PostStepOp, PredictionOp, RowOp, RowSpec
from attnctl.errors import ConfigError
from attnctl.plugins import StrategyManager

sys.path.insert(0, str(Path(__file__).parent))
from compat.compat_helpers import pag_pipeline  # noqa: E402
from toy_strategies import FactoryPlugin  # noqa: E402

PROMPT = "a red cube"
STEPS = 3


def _mask():
    m = np.zeros((64, 64), dtype=np.uint8)
    m[16:48, 20:44] = 255
    return m


def _kwargs(image_and_mask, **extra):
    image, mask = image_and_mask
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return dict(prompt=PROMPT, image=image, mask_image=mask, num_inference_steps=STEPS, guidance_scale=7.5,
                output_type="latent", latents=z, generator=torch.Generator().manual_seed(0), **extra)


def _run(pipe, make, kwargs):
    plugin = FactoryPlugin(make)
    ctl = attnctl.attach(pipe, {"strategies": {"s": {"strategy": "toy_ops"}}},
                         manager=StrategyManager(plugins=[plugin], autoload=False))
    layout = attnctl.BatchLayout.for_call(pipe, prompt=PROMPT, guidance_scale=kwargs["guidance_scale"])
    try:
        with ctl.run(layout, mask=torch.from_numpy(_mask())) as state:
            out = pipe(**kwargs).images
    finally:
        ctl.detach()
    return out, state


@pytest.fixture
def ddim_pipe(tiny_pipe):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    return tiny_pipe


@dataclass(eq=False)
class Cfg(PredictionOp):
    """Classifier-free guidance, as the pipeline computes it."""

    def combine(self, eps, ctx):
        layout = ctx.state.layout
        u, c = eps[list(layout.rows_of("main", "uncond"))], eps[list(layout.rows_of("main", "cond"))]
        return u + ctx.guidance_scale * (c - u)


def test_a_prediction_op_that_is_cfg_changes_nothing(ddim_pipe, image_and_mask):
    stock = ddim_pipe(**_kwargs(image_and_mask)).images
    out, _ = _run(ddim_pipe, lambda inst, sites: [Cfg(inst)], _kwargs(image_and_mask))
    assert torch.equal(out, stock)  # written into both branch rows: u + g (c - u) with u == c hands it on


@dataclass(eq=False)
class Halve(PostStepOp):
    calls: list = field(default_factory=list)

    def apply(self, latents, ctx):
        self.calls.append(ctx.state.step_index)
        return latents * 0.5 if ctx.state.step_index == STEPS - 1 else latents


def test_post_step_op_runs_after_every_step_and_edits_the_final_latent(ddim_pipe, image_and_mask):
    stock = ddim_pipe(**_kwargs(image_and_mask)).images
    op = Halve("h")
    out, _ = _run(ddim_pipe, lambda inst, sites: [op], _kwargs(image_and_mask))
    assert op.calls == list(range(STEPS))
    assert torch.equal(out, stock * 0.5)


@dataclass(eq=False)
class FixedNoise(NoiseOp):
    value: float = 0.0

    def noise(self, sample, ctx):
        return torch.full_like(sample, self.value)


def test_noise_op_feeds_the_schedulers_variance_noise(ddim_pipe, image_and_mask):
    seen = []
    step = ddim_pipe.scheduler.step

    def recording(model_output, timestep, sample, eta=0.0, use_clipped_model_output=False, generator=None,
                  variance_noise=None, return_dict=True):
        seen.append(variance_noise)
        return step(model_output, timestep, sample, eta, use_clipped_model_output, generator, variance_noise,
                    return_dict)

    ddim_pipe.scheduler.step = recording
    kwargs = _kwargs(image_and_mask, eta=1.0)
    a, _ = _run(ddim_pipe, lambda inst, sites: [FixedNoise(inst, value=0.3)], kwargs)
    assert len(seen) == STEPS and all(torch.equal(n, torch.full_like(n, 0.3)) for n in seen)
    b, _ = _run(ddim_pipe, lambda inst, sites: [FixedNoise(inst, value=-0.3)], _kwargs(image_and_mask, eta=1.0))
    assert not torch.allclose(a, b)
    del ddim_pipe.scheduler.step


def test_noise_op_refuses_a_scheduler_without_variance_noise(tiny_pipe, image_and_mask):
    from diffusers import EulerDiscreteScheduler

    tiny_pipe.scheduler = EulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    with pytest.raises(ConfigError, match="EulerDiscreteScheduler.step takes no variance_noise"):
        _run(tiny_pipe, lambda inst, sites: [FixedNoise(inst)], _kwargs(image_and_mask))


def test_two_prediction_ops_are_refused(ddim_pipe):
    plugin = FactoryPlugin(lambda inst, sites: [Cfg(inst)])
    with pytest.raises(ConfigError, match="only one combination"):
        attnctl.attach(ddim_pipe, {"strategies": {"a": {"strategy": "toy_ops"}, "b": {"strategy": "toy_ops"}}},
                       manager=StrategyManager(plugins=[plugin], autoload=False))


# --------------------------------------------------------------------------- PAG from parts
PAG_SCALE = 3.0


@dataclass(eq=False)
class PerturbedIdentity(BranchOp):
    """The perturbed rows' self-attention map is the identity: their output is their values."""

    def main_weight(self, call):
        return self._on(call, 0.0, 1.0)

    def branches(self, call):
        return [Branch(self._on(call, 1.0, 0.0), identity=True)]

    def _on(self, call, yes, no):
        roles = call.layout.roles
        return torch.tensor([yes if r == "perturbed" else no for r in roles], dtype=call.value.dtype)[:, None, None, None]


@dataclass(eq=False)
class PagCombine(PredictionOp):
    def combine(self, eps, ctx):
        layout = ctx.state.layout
        u, c = eps[list(layout.rows_of("main", "uncond"))], eps[list(layout.rows_of("main", "cond"))]
        p = eps[list(layout.rows_of("perturbed"))]
        return u + ctx.guidance_scale * (c - u) + PAG_SCALE * (c - p)


def _pag_parts(inst, sites):
    mid = [s for s in sites.of_kind("self") if s.stage == "mid"]
    return [RowOp(inst, row=RowSpec("perturbed", driver="shared", branches=("cond",))),
            PagCombine(inst), *(PerturbedIdentity(inst, site=s) for s in mid)]


def test_pag_written_from_parts_equals_diffusers_pag_processor(ddim_pipe):
    """One UNet call at a 16x16 latent (the mid block's grid is 2x2; at 8x8 it is one token, where the
    identity map *is* attention): diffusers' PAG processor on a [u, c, c] batch and its combination, vs
    the plugin on the pipeline's [u, c] call."""
    import copy

    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    unet = ddim_pipe.unet
    g = torch.Generator().manual_seed(0)
    x, emb, t = torch.randn(2, 9, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g), 500
    reference = copy.deepcopy(unet)
    reference.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(PAGCFGIdentitySelfAttnProcessor2_0())
    with torch.no_grad():
        u, c, p = reference(torch.cat([x, x[1:]]), t, torch.cat([emb, emb[1:]])).sample.chunk(3)
    expected = u + 7.5 * (c - u) + PAG_SCALE * (c - p)

    plugin = FactoryPlugin(_pag_parts)
    ctl = attnctl.attach(ddim_pipe, {"strategies": {"pag": {"strategy": "toy_ops"}}},
                         manager=StrategyManager(plugins=[plugin], autoload=False))
    ddim_pipe._guidance_scale = 7.5  # what the pipeline sets during its call
    with ctl.run(attnctl.BatchLayout.for_pipeline(1, 1, cfg=True)) as state, torch.no_grad():
        out = unet(x, t, emb).sample
    ctl.detach()
    assert state.layout.roles == ("main", "main", "perturbed") and state.layout.branches[2] == "cond"
    assert out.shape == (2, 4, 16, 16)  # the pipeline gets its own rows, both holding the guided prediction
    assert torch.equal(out[0], out[1])
    assert (out[0] - expected[0]).abs().max() < 1e-5
    assert (expected - (u + 7.5 * (c - u))).abs().max() > 1e-3  # the perturbation matters here


@dataclass(eq=False)
class RecordSteps(PostStepOp):
    seen: list = field(default_factory=list)

    def apply(self, latents, ctx):
        self.seen.append(ctx.state.step_index)
        return latents


def test_step_index_follows_a_schedule_that_repeats_a_timestep(tiny_pipe, image_and_mask):
    """PNDM's schedule repeats a timestep; each UNet call after a scheduler step is the next index."""
    from diffusers import PNDMScheduler

    tiny_pipe.scheduler = PNDMScheduler.from_config(tiny_pipe.scheduler.config, skip_prk_steps=True)
    op = RecordSteps("r")
    _run(tiny_pipe, lambda inst, sites: [op], _kwargs(image_and_mask))
    timesteps = [float(t) for t in tiny_pipe.scheduler.timesteps]
    assert len(set(timesteps)) < len(timesteps)  # the schedule does repeat one
    assert op.seen == list(range(len(timesteps)))
