"""latent_guidance: Attention Steer Loss and Attend-and-Excite against naive references,
on random maps and through the tiny UNet, plus its place in the pipeline's step."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import attnctl
from attnctl.errors import ConfigError, InputError
from attnctl.guidance import GuidanceContext, UNetCall
from attnctl.sites import Site
from attnctl.testing import build_tiny_inpaint_pipeline
from strategies import guidance_losses, latent_guidance, timestep_gate
from strategies.latent_guidance import LatentGuidanceParams, SteerLatent, _PassMaps, step_size_at
import reference_guidance as ref

LATENT = ref.LATENT
_mask_batch, reference_loss_and_grad = ref.mask_batch, ref.reference_loss_and_grad


def manager():
    return attnctl.StrategyManager(plugins=[latent_guidance, timestep_gate], autoload=False)


# ============================================================================ random maps
class _FakeState:
    """Just what ``_PassMaps.add`` reads from a run state."""

    def __init__(self, masks: dict[tuple[int, int], torch.Tensor], prompts, token_indices):
        self._masks, self.token_indices = masks, token_indices
        self.row_layout = SimpleNamespace(prompts=prompts)

    def grid(self, site):
        return {1: (8, 8), 2: (4, 4)}[site.level]

    def row_mask(self, site, device=None):
        return self._masks[self.grid(site)]


class _FakeCall:
    """Just what ``_PassMaps.add`` reads from an attention call."""

    def __init__(self, state: _FakeState, site: Site):
        self.state, self.site = state, site
        self.layout = state.row_layout

    def mask(self):
        return self.state.row_mask(self.site)


def _random_case(seed: int, zero_grid: tuple[int, int] | None = None):
    """Two images (prompts with 5 and 3 tokens), two grids with two sites each, 4 heads."""
    g = torch.Generator().manual_seed(seed)
    sites = [Site(f"s{i}", "cross", "down", i, level) for i, level in enumerate((1, 1, 2, 2))]
    logits = [torch.randn(2, 4, 4 ** (4 - s.level), 77, generator=g) * 3 for s in sites]
    masks = {grid: (torch.rand(2, grid[0] * grid[1], generator=g) > 0.5).float() for grid in ((8, 8), (4, 4))}
    if zero_grid is not None:
        masks[zero_grid][1] = 0.0  # image 1 has no masked patch at this grid
    state = _FakeState(masks, prompts=(0, 1), token_indices=[[1, 2, 3, 4, 5], [1, 2, 3]])
    return sites, logits, masks, state


def _fast_loss(sites, logits, state, **params):
    op = SteerLatent("steer", params=LatentGuidanceParams(**params), read_sites=tuple(sites), last_site=sites[-1])
    maps = _PassMaps()
    for site, lg in zip(sites, logits):
        maps.add(_FakeCall(state, site), lg.softmax(-1))
    return op.loss_from(maps, state)


def _reference_loss(sites, logits, masks, state, fn=ref.steer_loss_reference, **kw):
    per_image = []
    for i in range(2):
        per_image.append([(lg.double().softmax(-1)[i], state.grid(s)) for s, lg in zip(sites, logits)])
    mask_per_image = [{grid: m[i] for grid, m in masks.items()} for i in range(2)]
    return fn(per_image, mask_per_image, state.token_indices, **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_steer_loss_matches_naive_reference_on_random_maps(seed):
    sites, logits, masks, state = _random_case(seed)
    logits = [lg.requires_grad_(True) for lg in logits]
    fast = _fast_loss(sites, logits, state)
    fast_grads = torch.autograd.grad(fast, logits)
    lg64 = [lg.detach().double().requires_grad_(True) for lg in logits]
    naive = _reference_loss(sites, lg64, masks, state)
    naive_grads = torch.autograd.grad(naive, lg64)
    assert fast.dtype == torch.float32
    assert abs(float(fast.detach()) - float(naive.detach())) <= 1e-5  # measured: <= 1.7e-6 (loss ~50)
    for fg, ng in zip(fast_grads, naive_grads):
        assert (fg.double() - ng).abs().max() <= 1e-5  # measured: <= 2.5e-6 (|grad| up to 1.5)
    assert float(naive.detach()) > 0


def test_attend_excite_matches_naive_reference_on_random_maps():
    sites, logits, masks, state = _random_case(2)
    fast = _fast_loss(sites, logits, state, loss="attend_excite")
    naive = _reference_loss(sites, logits, masks, state, fn=ref.attend_excite_reference)
    assert abs(float(fast) - float(naive)) <= 1e-5
    assert 0 < float(naive) <= 2.0  # at most 1 per image


def test_token_column_shift():
    """Text position p is column p - 1 once the start token is dropped."""
    hw, grid = 16, (4, 4)
    mask = torch.zeros(1, hw)
    mask[0, :4] = 1
    probs = torch.full((1, hw, 77), 0.01)
    probs[0, :4, 3] = 0.2  # position 3 dominates the masked patches
    probs = probs / probs.sum(-1, keepdim=True)
    losses = {}
    for p in (2, 3, 4):
        tokens = torch.zeros(1, 77, dtype=torch.bool)
        tokens[0, p] = True
        losses[p] = float(guidance_losses.steer_loss(guidance_losses.GridMaps(probs, mask, grid, tokens, 100.0, 1e-4)))
    assert losses[3] < 0.2 and losses[2] > 1.0 and losses[4] > 1.0  # 0.105: S = (4/16) log(eps)
    naive = ref.steer_loss_grid(probs[0].double(), mask[0].double(), [3], 100.0, 1e-4)
    assert abs(losses[3] - float(naive)) <= 1e-6


@pytest.mark.parametrize("loss", ["steer", "attend_excite"])
def test_grid_without_masked_patch_gives_zero_not_nan(loss):
    sites, logits, masks, state = _random_case(3, zero_grid=(4, 4))
    fast = _fast_loss(sites, logits, state, loss=loss)
    naive = _reference_loss(
        sites, logits, masks, state, fn=ref.steer_loss_reference if loss == "steer" else ref.attend_excite_reference
    )
    assert torch.isfinite(fast) and abs(float(fast) - float(naive)) <= 1e-5
    # image 1 without any masked patch: loss 0 and gradient exactly 0
    for grid in masks:
        masks[grid][1] = 0.0
    logits = [lg.requires_grad_(True) for lg in logits]
    per_image = []
    for img in (0, 1):
        probs = torch.stack([lg.softmax(-1)[img].mean(0) for lg in logits[:2]]).mean(0)[None]
        tokens = torch.zeros(1, 77, dtype=torch.bool)
        tokens[0, 1:4] = True
        maps = guidance_losses.GridMaps(probs, masks[(8, 8)][img : img + 1], (8, 8), tokens, 100.0, 1e-4)
        per_image.append(guidance_losses.get_loss(loss)(maps)[0])
    assert float(per_image[1].detach()) == 0.0 and float(per_image[0].detach()) > 0
    grads = torch.autograd.grad(per_image[1], logits[:2])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_saturated_token_stays_finite():
    """All masked attention ~0 for a token: S_i >= 0 literally gives inf/NaN; the floor caps it."""
    probs = torch.zeros(1, 4, 77)
    probs[..., 5] = 1.0  # every patch attends to position 5 only
    tokens = torch.zeros(1, 77, dtype=torch.bool)
    tokens[0, 1] = True
    out = guidance_losses.steer_loss(guidance_losses.GridMaps(probs, torch.ones(1, 4), (2, 2), tokens, 100.0, 1e-4))
    assert torch.isfinite(out).all() and abs(float(out) - (-torch.log(torch.tensor(1e-4)).item())) < 1e-3


# ============================================================================ tiny UNet
TOKENS = [[1, 2, 3, 4, 5], [1, 2, 3]]


@pytest.fixture(scope="module")
def unet_case():
    """A tiny pipeline, a CFG batch of 2 images (2 prompts) and the strategy's loss/grad at step 0."""
    pipe = build_tiny_inpaint_pipeline(0)
    pipe.scheduler.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(4, 9, *LATENT, generator=g)
    emb = torch.randn(4, 77, 32, generator=g)
    t = float(pipe.scheduler.timesteps[0])
    ctl = attnctl.attach(pipe, {"strategies": {"steer": {"strategy": "latent_guidance"}}}, manager())
    layout = attnctl.BatchLayout.for_pipeline(2, 1, cfg=True)  # rows: uncond 0, 1; cond 2, 3
    z = sample[2:, :4].clone()
    calls: list[tuple] = []

    out = {}
    with ctl.run(layout, mask=_mask_batch(), token_indices=TOKENS) as state:
        state.begin_step(t, LATENT)
        ctx = GuidanceContext(state, UNetCall(pipe.unet, (), {"sample": sample, "timestep": t, "encoder_hidden_states": emb}), 4)
        op = ctl.plan.latent_ops[0]
        # every explicit map the core computes is reported to the run state with its size
        state.note_explicit = lambda site, chunk, size: calls.append((site.key, chunk, size))
        try:
            out["loss"], out["grad"] = op.loss_and_grad(z, ctx)
        finally:
            del state.note_explicit
        full = dataclasses.replace(op, params=dataclasses.replace(op.params, stop_early=False))
        out["loss_full"], out["grad_full"] = full.loss_and_grad(z, ctx)
        out["alpha"] = step_size_at(op.params, state)
        out["guided"] = op.guide(z, ctx)
    ctl.detach()
    return SimpleNamespace(pipe=pipe, sample=sample, emb=emb, t=t, z=z, op=op, calls=calls, **out)


def test_unet_loss_and_grad_match_naive_processors(unet_case):
    c = unet_case
    loss, grad = reference_loss_and_grad(
        c.pipe.unet, c.op.read_sites, c.z, c.sample[2:], c.emb[2:], c.t, _mask_batch(), TOKENS
    )
    assert abs(float(c.loss) - float(loss.detach())) <= 1e-5 * abs(float(loss.detach()))
    assert (c.grad.double() - grad).abs().max() <= 1e-5 * grad.abs().max()
    # image 1 has no masked patch at any read grid: zero gradient, never NaN
    assert torch.isfinite(c.grad).all()
    assert torch.equal(c.grad[1], torch.zeros_like(c.grad[1])) and c.grad[0].abs().max() > 0


def test_only_read_sites_materialize_maps(unet_case):
    c = unet_case
    read = {s.key for s in c.op.read_sites}
    assert read == {f"cross[{i}]" for i in (2, 3, 4, 5, 7, 8, 9, 10, 11, 12)}
    assert {key for key, *_ in c.calls} == read and len(c.calls) == len(read)  # once each, stopped after the last
    for key, chunk, size in c.calls:
        hw = 16 if key in {"cross[2]", "cross[3]", "cross[10]", "cross[11]", "cross[12]"} else 4
        assert (chunk, size) == (hw, 2 * 4 * hw * 77 * 4)  # cond rows only, 4 heads, H*W x 77, fp32, one chunk


def test_stop_early_equals_full_pass(unet_case):
    c = unet_case
    assert float(c.loss) == pytest.approx(float(c.loss_full), rel=1e-6)
    assert torch.allclose(c.grad, c.grad_full, atol=1e-7, rtol=1e-5)


def test_guide_is_one_gradient_step(unet_case):
    c = unet_case
    assert c.alpha == pytest.approx(20.0)  # k = 0: 20 * sqrt(1.0)
    assert torch.allclose(c.guided, c.z - c.alpha * c.grad, atol=1e-6)


def test_step_size_schedule():
    params = LatentGuidanceParams(step_size=20.0)
    for n, k in ((50, 0), (50, 19), (50, 49), (7, 3)):
        state = SimpleNamespace(num_inference_steps=n, step_index=k, timestep=0.0)
        assert step_size_at(params, state) == pytest.approx(ref.alpha_reference(20.0, n, k), rel=1e-12)
    assert step_size_at(LatentGuidanceParams(schedule="constant", step_size=3.0), None) == 3.0


def test_bf16_model_loss_is_fp32():
    pipe = build_tiny_inpaint_pipeline(1)
    pipe.unet.to(torch.bfloat16)
    pipe.scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    sample = torch.randn(1, 9, *LATENT, generator=g).to(torch.bfloat16)
    emb = torch.randn(1, 77, 32, generator=g).to(torch.bfloat16)
    t = float(pipe.scheduler.timesteps[0])
    with attnctl.attach(pipe, {"strategies": {"steer": {"strategy": "latent_guidance"}}}, manager()) as ctl:
        with ctl.run(attnctl.BatchLayout.for_pipeline(1, 1, cfg=False), mask=_mask_batch()[:1], token_indices=[[1, 2]]) as st:
            st.begin_step(t, LATENT)
            ctx = GuidanceContext(st, UNetCall(pipe.unet, (), {"sample": sample, "timestep": t, "encoder_hidden_states": emb}), 4)
            op = ctl.plan.latent_ops[0]
            loss, grad = op.loss_and_grad(sample[:, :4], ctx)
            guided = op.guide(sample[:, :4], ctx)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and float(loss) > 0
    assert grad.dtype == torch.bfloat16 and guided.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()


# ============================================================================ pipeline
def _run(pipe, config, steps, **kwargs):
    return ref.run_guided(pipe, config, manager(), steps, **kwargs)


def test_guidance_runs_before_the_first_noise_prediction():
    """The first UNet call of the pipeline sees z_T - alpha_0 * grad L_s(z_T), on both CFG rows."""
    pipe = build_tiny_inpaint_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 4, *LATENT, generator=torch.Generator().manual_seed(5))
    config = {"strategies": {"steer": {"strategy": "latent_guidance", "step_size": 5.0}}}
    history, n, first = ref.first_main_call(pipe, config, manager(), 2, noise)
    assert [h["step"] for h in history] == [0, 1] and history[0]["alpha"] == pytest.approx(5.0)
    site_table = attnctl.describe_sites(pipe.unet)
    read = attnctl.select_sites("cross/4,cross/2", site_table)
    cond = first["sample"][1:]
    _, grad = reference_loss_and_grad(
        pipe.unet, read, noise, cond, first["emb"][1:], first["t"], _mask_batch()[:1], [list(range(1, n + 1))]
    )
    expected = noise - 5.0 * grad.float()
    assert grad.abs().max() > 0
    for row in (0, 1):  # uncond and cond rows both start from the guided latent
        assert (first["sample"][row : row + 1, :4] - expected).abs().max() <= 1e-5


def test_one_update_lowers_the_loss_on_the_same_step():
    """iterations=2: the second pass of a step measures the loss after the first update."""
    pipe = build_tiny_inpaint_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    config = {"strategies": {"steer": {"strategy": "latent_guidance", "iterations": 2}}}
    history, _ = _run(pipe, config, steps=2, guidance_scale=1.0)
    by_step = {}
    for h in history:
        by_step.setdefault(h["step"], []).append(h["loss"])
    assert sorted(by_step) == [0, 1]
    before, after = by_step[0]
    assert after < before, (before, after)


def test_gated_guidance_runs_only_in_the_structure_phase():
    """With HarmonPaint's rule (t/T >= 0.6) and DDIM 5 steps (t = 801, 601, 401, ...): steps 0 and 1,
    with alpha_k from the full 5-step schedule."""
    pipe = build_tiny_inpaint_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    config = {"strategies": {"steer": {"strategy": "latent_guidance"},
                             "phases": {"strategy": "timestep_gate", "rules": {"steer": {"min": 0.6}}}}}
    history, _ = _run(pipe, config, steps=5, guidance_scale=1.0)
    assert [h["step"] for h in history] == [0, 1]
    assert [h["alpha"] for h in history] == pytest.approx([ref.alpha_reference(20.0, 5, k) for k in (0, 1)])


# ============================================================================ config
def _attach_error(settings, pipe=None):
    pipe = pipe or build_tiny_inpaint_pipeline(0)
    with pytest.raises(ConfigError) as err:
        attnctl.attach(pipe, {"strategies": {"steer": {"strategy": "latent_guidance", **settings}}}, manager())
    return str(err.value)


def test_bad_config_is_refused():
    pipe = build_tiny_inpaint_pipeline(0)
    assert "did you mean 'steer'" in _attach_error({"loss": "ster"}, pipe)
    assert "self-attention sites" in _attach_error({"read_sites": "self[0],cross/4"}, pipe)
    assert "start token" in _attach_error({"tokens": [0, 1]}, pipe)
    assert "schedule" in _attach_error({"schedule": "cosine"}, pipe)
    assert "iterations" in _attach_error({"iterations": 0}, pipe)


def test_missing_token_indices_is_an_input_error():
    pipe = build_tiny_inpaint_pipeline(0)
    with pytest.raises(InputError, match="token_indices"):
        _run_without_tokens(pipe)


def _run_without_tokens(pipe):
    from PIL import Image

    pipe.set_progress_bar_config(disable=True)
    with attnctl.attach(pipe, {"strategies": {"steer": {"strategy": "latent_guidance"}}}, manager()) as ctl:
        mask = _mask_batch()[0, 0]
        with ctl.run(attnctl.BatchLayout.for_pipeline(1, 1, cfg=False), mask=mask):
            img = Image.new("RGB", (64, 64))
            pipe("x", image=img, mask_image=Image.fromarray((mask.numpy() * 255).astype("uint8")),
                 height=64, width=64, num_inference_steps=1, guidance_scale=1.0, output_type="latent")


def test_explicit_token_list_is_used():
    sites, logits, masks, state = _random_case(4)
    explicit = _fast_loss(sites, logits, state, tokens=[2, 4])
    naive = _reference_loss(sites, logits, masks, SimpleNamespace(token_indices=[[2, 4], [2, 4]], grid=state.grid))
    assert abs(float(explicit) - float(naive)) <= 1e-5


def test_registered_through_entry_points():
    strategies = attnctl.StrategyManager().strategies()
    assert {"latent_guidance", "timestep_gate"} <= set(strategies)
    table = {row[0]: row[2] for row in strategies["latent_guidance"].parameter_table()}
    assert table == {
        "read_sites": "cross/4,cross/2", "loss": "steer", "step_size": 20.0, "schedule": "sqrt_linspace",
        "iterations": 1, "step_rule": "paper", "step_region": "all", "mask_edge": 1.0, "record_loss_after": False,
        "tokens": "prompt", "token_scale": 100.0, "eps": 1e-4, "stop_early": True,
    }
