"""attend_excite against a naive Attend-and-Excite loop written from the authors' pipeline.

The reference runs image by image on a deep copy of the tiny UNet with explicit-softmax
processors at the read sites: a fresh UNet pass for every loss, the loss with explicit
softmax, reflect padding and 3x3 convolution in Python loops, Python's max, and the
refinement loop as the authors wrote it. The plugin runs inside the real pipeline.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import attnctl
from attnctl.errors import ConfigError, InputError
from attnctl.guidance import UNetCall
from attnctl.testing import build_tiny_inpaint_pipeline
from strategies import attend_excite
from strategies._smoothing import smoothing_kernel
from strategies.attend_excite import AttendExciteParams, ExciteLatent
from reference_guidance import NaiveRecordingProcessor

PROMPTS = ["a red cat", "a blue dog"]


def manager():
    return attnctl.StrategyManager(plugins=[attend_excite], autoload=False)


# ============================================================================ naive reference
def ref_kernel(size: int, sigma: float) -> list[list[float]]:
    """prod over both axes of exp(-(((x - mean) / (2 sigma)) ** 2)), normalized to sum 1."""
    mean = (size - 1) / 2
    w = [math.exp(-(((x - mean) / (2 * sigma)) ** 2)) for x in range(size)]
    total = sum(w[r] * w[c] for r in range(size) for c in range(size))
    return [[w[r] * w[c] / total for c in range(size)] for r in range(size)]


def reflect(i: int, n: int) -> int:
    return -i if i < 0 else 2 * n - 2 - i if i >= n else i


def ref_loss(a, grid, tokens, last, p: AttendExciteParams):
    """``a`` [HW, 77]: max over tokens of max(0, 1 - max of the smoothed renormalized map) (Python max)."""
    h, w = grid
    text = a[:, 1:last] * 100
    e = torch.exp(text - text.max(dim=-1, keepdim=True).values)
    text = e / e.sum(dim=-1, keepdim=True)
    k, n = ref_kernel(p.kernel_size, p.sigma), p.kernel_size
    losses = []
    for token in tokens:
        img = [[text[y * w + x, token - 1] for x in range(w)] for y in range(h)]
        if p.smooth:  # pad 1 (reflect), then a valid convolution with the n x n kernel
            pad = [[img[reflect(y - 1, h)][reflect(x - 1, w)] for x in range(w + 2)] for y in range(h + 2)]
            img = [[sum(k[r][c] * pad[y + r][x + c] for r in range(n) for c in range(n))
                    for x in range(w + 3 - n)] for y in range(h + 3 - n)]
        m = max(v for row in img for v in row)
        losses.append(max(0, 1.0 - m))
    return max(losses)


class Reference:
    """The authors' per-image loop on a deep copy of the UNet."""

    def __init__(self, pipe, p: AttendExciteParams, first_call, token_lists):
        self.unet, self.p, self.tokens = copy.deepcopy(pipe.unet), p, token_lists
        self.sites = attnctl.select_sites(p.read_sites, attnctl.describe_sites(pipe.unet))
        self.store: list[torch.Tensor] = []
        for site in self.sites:
            self.unet.get_submodule(site.name).set_processor(NaiveRecordingProcessor(self.store))
        self.extra, self.emb = first_call["sample"][:, 4:], first_call["emb"]
        self.scheduler = copy.deepcopy(pipe.scheduler)

    def loss(self, z, b, t):
        """A fresh pass on image ``b``'s cond row; (loss, d loss / d z)."""
        n = len(self.tokens)  # images; their cond rows follow the n uncond rows
        z = z.detach().requires_grad_(True)
        self.store.clear()
        with torch.enable_grad():
            row = slice(n + b, n + b + 1)
            self.unet(torch.cat([z, self.extra[row]], 1), t, encoder_hidden_states=self.emb[row])
            maps = torch.cat([probs[0] for probs in self.store])  # every head of every read site
            a = maps.sum(0) / maps.shape[0]
            grid = self.sites[0].grid((self.extra.shape[-2], self.extra.shape[-1]))
            last = max(self.tokens[b]) + 1 if self.p.last_token == "eot" else -1
            tokens = self.tokens[b] if self.p.tokens == "prompt" else list(self.p.tokens)
            loss = ref_loss(a, grid, tokens, last, self.p)
            if not torch.is_tensor(loss):
                return loss, None
            return loss, torch.autograd.grad(loss, z)[0]

    def run(self, latents, steps, guidance_scale, forced=None):
        """The loop from ``latents``; with ``forced`` (the plugin's main UNet calls), each step after
        the first starts from the plugin's own latent: DDIM on the plugin's guided latent and noise."""
        p, sched = self.p, self.scheduler
        sched.set_timesteps(steps)
        n = len(sched.timesteps)
        out = {"guided": [], "eps": [], "iterations": []}
        for i, t in enumerate(sched.timesteps):
            if forced is not None and i > 0:
                uncond, cond = forced[i - 1]["eps"].chunk(2)
                prev = forced[i - 1]["sample"][: latents.shape[0], :4]
                eps = uncond + guidance_scale * (cond - uncond)
                latents = sched.step(eps, sched.timesteps[i - 1], prev).prev_sample
            start, end = p.scale_range
            step_size = p.scale_factor * math.sqrt(start + (end - start) * i / (n - 1))
            updated, iters = [], []
            for b in range(latents.shape[0]):
                z = latents[b : b + 1]
                loss, grad = self.loss(z, b, t)
                iteration = 0
                if i in p.thresholds and loss > 1.0 - p.thresholds[i]:
                    target = max(0, 1.0 - p.thresholds[i])
                    while loss > target:
                        iteration += 1
                        loss, grad = self.loss(z, b, t)
                        if loss != 0:
                            z = z - step_size * grad
                        if iteration >= p.max_refinement_steps:
                            break
                    loss, grad = self.loss(z, b, t)
                if i < p.max_iter_to_alter and loss != 0:
                    z = z - step_size * grad
                updated.append(z.detach())
                iters.append(iteration)
            latents = torch.cat(updated)
            self.store.clear()
            with torch.no_grad():
                x = sched.scale_model_input(torch.cat([latents] * 2), t)
                eps = self.unet(torch.cat([x, self.extra], 1), t, encoder_hidden_states=self.emb).sample
            out["guided"].append(latents)
            out["eps"].append(eps)
            out["iterations"].append(iters)
            uncond, cond = eps.chunk(2)
            latents = sched.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
        out["final"] = latents
        return out


# ============================================================================ the plugin in the pipeline
def run_plugin(pipe, settings, steps, latents, guidance_scale=7.5):
    """Run the pipeline with the plugin; per main UNet call: its sample, timestep, embeddings and output."""
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:44] = 255
    tokens = [list(range(1, len(pipe.tokenizer(p).input_ids) - 1)) for p in PROMPTS]
    calls = []
    config = {"strategies": {"ae": {"strategy": "attend_excite", **settings}}}
    with attnctl.attach(pipe, config, manager()) as ctl:
        def pre(module, args, kwargs):
            if not ctl.state.in_guidance:
                c = UNetCall(module, args, kwargs)
                calls.append({"sample": c.get("sample").clone(), "t": c.get("timestep"),
                              "emb": c.get("encoder_hidden_states").clone()})

        def post(module, args, kwargs, output):
            if not ctl.state.in_guidance:
                calls[-1]["eps"] = output[0].clone()

        hooks = [pipe.unet.register_forward_pre_hook(pre, with_kwargs=True),
                 pipe.unet.register_forward_hook(post, with_kwargs=True)]
        try:
            with ctl.run(attnctl.BatchLayout.for_pipeline(2, 1, cfg=True), mask=Image.fromarray(mask),
                         token_indices=tokens) as state:
                final = pipe(PROMPTS, image=image, mask_image=Image.fromarray(mask), height=64, width=64,
                             num_inference_steps=steps, guidance_scale=guidance_scale, latents=latents,
                             output_type="latent", generator=torch.Generator().manual_seed(0)).images
        finally:
            for h in hooks:
                h.remove()
    history = state.scratch["ae"]["history"]
    return SimpleNamespace(calls=calls, final=final, history=history, tokens=tokens)


# The tiny model's gradients are ~100x smaller than SD's, hence the larger scale factors. REFINE:
# at step 0 the losses start near 0.986 and fall ~4e-4 per update, so a target of 0.985 stops
# image 0 after 4 iterations and image 1 after 2; the target of step 1 (0.5) is out of reach,
# so both stop at max_refinement_steps; steps 2 and 3 are left alone.
REFINE = dict(read_sites="cross/2", tokens=[1, 2, 3], scale_factor=500.0, max_iter_to_alter=2,
              thresholds={0: 0.015, 1: 0.5}, max_refinement_steps=5)
VARIANT = dict(read_sites="cross/4", tokens="prompt", scale_factor=200.0, max_iter_to_alter=3,
               thresholds={0: 0.2}, max_refinement_steps=3, last_token="eot", smooth=False)


@pytest.mark.parametrize("settings", [REFINE, VARIANT], ids=["refine", "eot-unsmoothed"])
def test_matches_the_authors_loop_step_by_step(settings):
    pipe = build_tiny_inpaint_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    steps = 4
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    got = run_plugin(pipe, settings, steps, latents)
    p = attend_excite.SPEC.params(**settings)
    want = Reference(pipe, p, got.calls[0], got.tokens).run(latents, steps, 7.5, forced=got.calls)
    assert len(got.calls) == steps
    for i, call in enumerate(got.calls):  # step by step, each from the plugin's latent before the update
        guided = torch.cat([want["guided"][i]] * 2)
        assert (call["sample"][:, :4] - guided).abs().max() <= 1e-5, i
        assert (call["eps"] - want["eps"][i]).abs().max() <= 1e-5, i
    # free-running: CFG 7.5 and DDIM's x0 step amplify 1e-6 differences of the noise (explicit softmax
    # vs fused attention) about tenfold per step, so the whole trajectory is compared at 1e-4
    free = Reference(pipe, p, got.calls[0], got.tokens).run(latents, steps, 7.5)
    assert (got.final - free["final"]).abs().max() <= 1e-4
    assert free["iterations"] == want["iterations"]
    due = [i for i in range(steps) if i < p.max_iter_to_alter or i in p.thresholds]
    assert [h["step"] for h in got.history] == due
    assert [h["iterations"] for h in got.history] == [want["iterations"][i] for i in due]
    if settings is REFINE:
        # step 0: both refine, stop by the threshold after >= 2 iterations, at different counts;
        # step 1: the target is out of reach, both stop at max_refinement_steps
        first, second = got.history[0]["iterations"], got.history[1]["iterations"]
        assert min(first) >= 2 and first[0] != first[1] and max(first) < p.max_refinement_steps
        assert second == [p.max_refinement_steps] * 2
    # the steps the method leaves alone are the stock model's: bit-identical noise predictions
    for call in got.calls[max(due) + 1 :]:
        with torch.no_grad():
            stock = pipe.unet(call["sample"], call["t"], encoder_hidden_states=call["emb"]).sample
        assert torch.equal(stock, call["eps"])


# ============================================================================ pieces
def test_kernel_is_the_authors_not_the_textbook_gaussian():
    for size, sigma in ((3, 0.5), (5, 1.0)):
        kernel = smoothing_kernel(size, sigma)[0, 0]
        assert torch.allclose(kernel, torch.tensor(ref_kernel(size, sigma)), atol=1e-7, rtol=0)
        d = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        g = torch.exp(-(d**2) / (2 * sigma**2))
        textbook = (g[:, None] * g[None, :]) / (g[:, None] * g[None, :]).sum()
        assert (kernel.double() - textbook).abs().max() > 0.01
    k = smoothing_kernel(3, 0.5)[0, 0]
    assert float(k[0, 1] / k[1, 1]) == pytest.approx(math.exp(-1))  # textbook: exp(-2)


def test_ties_go_to_the_first_token_like_pythons_max():
    """Two tokens with the same map: the gradient flows through the first only (amax would split it)."""
    layout = attnctl.BatchLayout.for_pipeline(1, 1, cfg=False)
    state = SimpleNamespace(layout=layout, token_indices=[[1, 2, 3]])
    op = ExciteLatent("ae", params=AttendExciteParams(tokens=(2, 3)), last_site=None)
    logits = torch.randn(16, 77, generator=torch.Generator().manual_seed(0))
    logits[:, 3] = logits[:, 2]
    logits.requires_grad_(True)
    maps = logits.softmax(-1)
    loss = op.losses(maps[None], (4, 4), state)
    grad = torch.autograd.grad(loss.sum(), logits, retain_graph=True)[0]
    want = ref_loss(maps, (4, 4), [2, 3], -1, AttendExciteParams(tokens=(2, 3)))
    ref_grad = torch.autograd.grad(want, logits)[0]
    assert abs(float(loss.detach()) - float(want.detach())) <= 1e-6
    assert (grad - ref_grad).abs().max() <= 1e-6
    assert not torch.allclose(grad[:, 2], grad[:, 3])


def _attach_error(settings):
    pipe = build_tiny_inpaint_pipeline(0)
    with pytest.raises(ConfigError) as err:
        attnctl.attach(pipe, {"strategies": {"ae": {"strategy": "attend_excite", **settings}}}, manager())
    return str(err.value)


def test_bad_config_is_refused():
    assert "tokens: give the positions" in _attach_error({})
    assert "tokens: give the positions" in _attach_error({"tokens": "nouns"})
    assert "start at 1" in _attach_error({"tokens": [0, 2]})
    assert "last_token" in _attach_error({"tokens": [1], "last_token": "end"})
    assert "thresholds" in _attach_error({"tokens": [1], "thresholds": {0: 1.5}})
    assert "thresholds" in _attach_error({"tokens": [1], "thresholds": {"first": 0.5}})
    assert "one grid" in _attach_error({"tokens": [1], "read_sites": "cross/4,cross/2"})
    assert "cross-attention" in _attach_error({"tokens": [1], "read_sites": "self/4"})
    assert "kernel_size" in _attach_error({"tokens": [1], "kernel_size": 2})


def test_token_outside_the_softmax_is_an_input_error():
    pipe = build_tiny_inpaint_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(InputError, match="must lie in 1..7"):  # "a red cat": 7 tokens, EOT at 8
        run_plugin(pipe, {"tokens": [8], "last_token": "eot"}, 1, None)


def test_registered_through_entry_points():
    spec = attnctl.StrategyManager().strategies()["attend_excite"]
    table = {row[0]: row[2] for row in spec.parameter_table()}
    assert table == {
        "read_sites": "cross/4", "tokens": (), "scale_factor": 20.0, "scale_range": (1.0, 0.5),
        "max_iter_to_alter": 25, "thresholds": {0: 0.05, 10: 0.5, 20: 0.8}, "max_refinement_steps": 20,
        "sigma": 0.5, "kernel_size": 3, "smooth": True, "last_token": "drop_last",
    }
