"""Toy strategy plugins used by the core's tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import attnctl
from attnctl import GateOp, LatentOp, ReweightOp, StrategySpec, select_sites


@dataclass
class ScaleParams:
    sites: str = field(default="self[2:7]", metadata={"help": "sites to act on"})
    factor: float = field(default=0.5, metadata={"help": "value scale"})


@dataclass(eq=False)
class ScaleValues(ReweightOp):
    """W = factor * 1 1^T: scales the attention output (rank-1 reweighting)."""

    factor: float = 1.0

    def factors(self, call):
        one = call.query.new_ones(1, 1, 1, 1)
        return [(one, one * self.factor)]


class ScalePlugin:
    """Provides 'toy_scale': multiplies attention outputs at the chosen sites."""

    @attnctl.hookimpl
    def attnctl_add_strategies(self):
        return [StrategySpec("toy_scale", "multiplies attention outputs", ScaleParams)]

    @attnctl.hookimpl
    def attnctl_plan(self, instance, spec, params, sites):
        if spec.name != "toy_scale":
            return None
        return [ScaleValues(instance, site=s, factor=params.factor) for s in select_sites(params.sites, sites)]


@dataclass
class MaskGainParams:
    sites: str = "self[4:9]"
    gain: float = 2.0


@dataclass(eq=False)
class MaskGain(ReweightOp):
    """W = 1 (gain on masked keys): exercised together with ScaleValues at shared sites."""

    gain: float = 1.0

    def factors(self, call):
        m = call.mask()[:, None, :, None].to(call.value.dtype)
        one = call.query.new_ones(1, 1, 1, 1)
        return [(one, 1 + (self.gain - 1) * m)]


class MaskGainPlugin:
    @attnctl.hookimpl
    def attnctl_add_strategies(self):
        return [StrategySpec("toy_mask_gain", "boosts values of masked keys", MaskGainParams)]

    @attnctl.hookimpl
    def attnctl_plan(self, instance, spec, params, sites):
        if spec.name != "toy_mask_gain":
            return None
        return [MaskGain(instance, site=s, gain=params.gain) for s in select_sites(params.sites, sites)]


@dataclass
class ShiftParams:
    amount: float = 0.1
    first_step_only: bool = True


@dataclass(eq=False)
class ShiftLatents(LatentOp):
    """z <- z + amount, recording what it saw (for the guidance-plumbing tests)."""

    amount: float = 0.0
    first_step_only: bool = True
    seen: list = field(default_factory=list)

    def guide(self, z, ctx):
        self.seen.append((ctx.state.step_index, z.clone()))
        eps = ctx.denoise_cond(z.requires_grad_(True))
        assert eps.requires_grad, "the conditional pass must carry gradients"
        return z.detach() + self.amount


class ShiftPlugin:
    def __init__(self):
        self.ops: list[ShiftLatents] = []

    @attnctl.hookimpl
    def attnctl_add_strategies(self):
        return [StrategySpec("toy_shift", "adds a constant to z_t", ShiftParams)]

    @attnctl.hookimpl
    def attnctl_plan(self, instance, spec, params, sites):
        if spec.name != "toy_shift":
            return None
        gates = (lambda state: state.step_index == 0,) if params.first_step_only else ()
        op = ShiftLatents(instance, amount=params.amount, gates=gates)
        self.ops.append(op)
        return [op]


@dataclass
class WindowParams:
    target: str = ""
    min: float = 0.0


class WindowPlugin:
    """A minimal gate: target active when t / T_train >= min."""

    @attnctl.hookimpl
    def attnctl_add_strategies(self):
        return [StrategySpec("toy_window", "gates one instance", WindowParams)]

    @attnctl.hookimpl
    def attnctl_plan(self, instance, spec, params, sites):
        if spec.name != "toy_window":
            return None
        lo = params.min
        return [GateOp(instance, targets=(params.target,), gate=lambda state: state.t_norm >= lo)]


def run_pipe(pipe, image, mask, prompts=("a cat",), cfg=True, num_images_per_prompt=1, steps=3, latents=None, seed=0):
    """Run the tiny pipeline deterministically at 64x64 and return numpy images."""
    return pipe(
        list(prompts),
        image=image,
        mask_image=mask,
        num_inference_steps=steps,
        guidance_scale=7.5 if cfg else 1.0,
        num_images_per_prompt=num_images_per_prompt,
        height=64,
        width=64,
        latents=latents,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).images


@dataclass
class NoParams:
    pass


class FactoryPlugin:
    """Provides strategy ``name`` whose ops are ``make(instance, sites)``: any op list, for core tests."""

    def __init__(self, make, name: str = "toy_ops"):
        self.make, self.name = make, name

    @attnctl.hookimpl
    def attnctl_add_strategies(self):
        return [StrategySpec(self.name, "ops made by a test", NoParams)]

    @attnctl.hookimpl
    def attnctl_plan(self, instance, spec, params, sites):
        if spec.name != self.name:
            return None
        return list(self.make(instance, sites))
