"""``visual_style_prompting`` against the authors' swapping self-attention, written literally here.

- Site level: random q/k/v for a layout with reference rows, against the authors' batch
  ``[ref, tgt_1, tgt_2]`` per CFG half with their slicing (every row of a half reads the
  keys/values of row 0 of the half), explicit float64 softmax.
- Pipeline level: the tiny inpainting pipeline (float64, DDIM) against the stock pipeline run
  on the authors' batch (``prompt=[ref, main, main]``) whose UNet has that swap at the chosen
  sites, the guidance ``20`` while ``i < early_steps`` (the callback sets the scale, as their
  ``if i < 3``), and for a real reference row 0 re-noised every step (``add_noise(z0, noise, t)``,
  fresh noise). Final latents agree to 1e-9; controls must fail.
"""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

import attnctl
from attnctl import ActiveOps, BatchLayout, ConfigError, Site, StrategyManager, describe_sites
from attnctl.attention import compute
from attnctl.errors import InputError, RunWarning
from attnctl.sites import SiteTable
from reference_attention import NaiveSelfAttnProcessor, make_call, random_case, single_thread, softmax_attention
from strategies import visual_style_prompting as vsp

_one_thread = pytest.fixture(autouse=True)(single_thread)

ROLE = "vsp"
SITE = Site("up_blocks.3.attentions.0.transformer_blocks.0.attn1", "self", "up", 13, 0)
SCALE = 16**-0.5
MAIN, REF = "a red cube", "a blue ball in origami style"
STEPS, G = 4, 7.0


def authors_swap(q, k, v, scale, ref=0, halves=2):
    """Their ``swapping_attention``, explicit softmax: per ``chunk(halves)``, every row reads row ``ref``'s K/V."""
    out = []
    for qh, kh, vh in zip(q.chunk(halves), k.chunk(halves), v.chunk(halves)):
        idx = [ref] * qh.shape[0]
        out.append(softmax_attention(qh, kh[idx], scale) @ vh[idx].double())
    return torch.cat(out)


def planned(table=None, **params):
    params = vsp.VisualStylePromptingParams(**{"reference_prompt": "x", **params})
    ops = vsp.attnctl_plan(ROLE, vsp.SPEC, params, table or SiteTable([SITE]))
    return ops[0], [op for op in ops[1:] if isinstance(op, vsp.ReferenceKV)]


# ----------------------------------------------------------------------------- site level
@pytest.mark.parametrize("cfg", [True, False])
def test_site_matches_the_authors_slicing(cfg):
    layout = BatchLayout.for_pipeline(1, 2, cfg=cfg).with_rows([(ROLE, False, None)])
    mask, q, k, v = random_case(layout, (8, 8), [(2, 2, 6, 5)] * 2)
    _, call = make_call(SITE, mask, (8, 8), layout, q, k, v, SCALE)
    row, ops = planned()
    assert row.row.driver == "free" and not row.row.per_image and [op.site for op in ops] == [SITE]
    out = compute(call, ActiveOps.of(ops))
    # the authors' batch: per branch [ref, image 0, image 1]
    order = [r for b in ("uncond", "cond") for r in [*layout.rows_of(ROLE, b), *layout.rows_of("main", b)]]
    theirs = torch.empty_like(out, dtype=torch.float64)
    theirs[order] = authors_swap(q[order], k[order], v[order], SCALE, halves=2 if cfg else 1)
    err = (out.double() - theirs).abs().max().item()
    print(f"vsp site cfg={cfg}: max abs err {err:.2e}")
    assert err <= 1e-5
    refs = list(layout.rows_of(ROLE))
    plain = compute(make_call(SITE, mask, (8, 8), layout, q, k, v, SCALE)[1], ActiveOps.of([]))
    assert torch.equal(out[refs], plain[refs])  # the reference rows keep their own attention, bit for bit
    wrong = torch.empty_like(theirs)
    wrong[order] = authors_swap(q[order], k[order], v[order], SCALE, halves=1)  # control: one reference for both halves
    if cfg:
        assert (out.double() - wrong).abs().max() > 1e-2


# ----------------------------------------------------------------------------- pipeline level
@pytest.fixture
def pipe64(tiny_pipe):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    return tiny_pipe.to(torch.float64)


def _z(seed, dtype=torch.float64):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _run(pipe, image_and_mask, prompt, latents, scale=G, n=1, callback=None):
    image, mask = image_and_mask
    return pipe(prompt=prompt, image=image, mask_image=mask, num_images_per_prompt=n, num_inference_steps=STEPS,
                guidance_scale=scale, strength=1.0, latents=latents, output_type="latent",
                callback_on_step_end=callback, generator=torch.Generator().manual_seed(0)).images


def _ours(pipe, image_and_mask, **params):
    config = {"strategies": {ROLE: {"strategy": vsp.NAME, "keep_reference": True, **params}}}
    layout = BatchLayout.for_call(pipe, prompt=MAIN, num_images_per_prompt=2, guidance_scale=G)
    with attnctl.attach(pipe, config, StrategyManager()) as ctl, ctl.run(layout) as state:
        out = _run(pipe, image_and_mask, MAIN, torch.cat([_z(1), _z(2)]), n=2)
    return out, state.row_outputs[ROLE]


def _calibrating_step(pipe, unet, start, end):
    """Their DDIM step with colour calibration (scheduling_ddim.py): while start > t > end every row's x0
    (row 0's from its conditional prediction, their use_prompt_as_null) takes row 0's per-channel mean and
    unbiased std, x_prev = sqrt(a') x0 + sqrt(1 - a') eps."""
    cond = {}
    unet.register_forward_hook(lambda m, a, out: cond.__setitem__("ref", out[0][len(out[0]) // 2].clone()))
    original, sched = pipe.scheduler.step, pipe.scheduler

    def step(model_output, timestep, sample, *args, **kwargs):
        t = int(timestep)
        if not start > t > end:
            return original(model_output, timestep, sample, *args, **kwargs)
        prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        eps = model_output.clone()
        eps[0] = cond["ref"]
        x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        mean, std = x0.mean((2, 3), keepdim=True), x0.std((2, 3), keepdim=True)
        x0 = (x0 - mean) / (std + 1e-8) * std[:1] + mean[:1]
        return (a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps,)

    pipe.scheduler.step = step


def _theirs(pipe, image_and_mask, z_ref, early=(20.0, 0), ref=0, clean=None, ref_scale=None, fresh=True,
            calibrate=None):
    """The authors' batch and loop; ``ref_scale``: the reference row guided at that scale in the early steps;
    ``fresh=False``: the same re-noising noise every step (a control)."""
    scale, n_early = early
    unet, swap = copy.deepcopy(pipe.unet), NaiveSelfAttnProcessor(lambda q, k, v, s: authors_swap(q, k, v, s, ref))
    for site in vsp.default_sites(describe_sites(unet)):
        unet.get_submodule(site.name).set_processor(swap)
    theirs = type(pipe)(**{**pipe.components, "unet": unet})
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler.set_timesteps(STEPS)
    ts, gen = theirs.scheduler.timesteps, torch.Generator().manual_seed(0)

    def renoise(latents, i):  # their latents[0] = add_noise(z0, fresh noise, t) before each step
        if clean is not None and i < STEPS:
            noise = torch.randn(clean.shape, generator=gen if fresh else torch.Generator().manual_seed(0))
            noise = noise.to(clean.dtype)
            latents = torch.cat([theirs.scheduler.add_noise(clean, noise, ts[i : i + 1]), latents[1:]])
        return latents

    def step_end(p, i, t, kw):
        p._guidance_scale = scale if i + 1 < n_early else G
        return {"latents": renoise(kw["latents"], i + 1)}

    def guide_ref(module, args, out):  # the pipeline's u + s (c' - u) = u + ref_scale (c - u) on their row 0
        s = theirs._guidance_scale
        if s == ref_scale:
            return None
        eps = out[0].clone()
        eps[3] = eps[0] + ref_scale / s * (eps[3] - eps[0])  # rows: u_ref, u_1, u_2, c_ref, c_1, c_2
        return (eps,)

    if ref_scale is not None:
        unet.register_forward_hook(guide_ref)
    if calibrate is not None:
        _calibrating_step(theirs, unet, *calibrate)
    latents = renoise(torch.cat([z_ref, _z(1), _z(2)]), 0)
    try:
        out = _run(theirs, image_and_mask, [REF, MAIN, MAIN], latents, scale=scale if n_early else G,
                   callback=step_end)
    finally:
        theirs.scheduler.__dict__.pop("step", None)  # the scheduler is the caller's pipeline's too
    return out[1:], out[:1]


CASES = {  # params; the authors' (early scale, early steps), the reference row's early scale
    "generated": ({"advanced_sampling": False}, (20.0, 0), None),
    "generated-advanced": ({"early_steps": 2}, (20.0, 2), None),  # their reference row gets 20 too, as ours
}


@pytest.mark.parametrize("case", list(CASES))
def test_generated_reference_matches_the_authors_batch(pipe64, image_and_mask, case):
    params, early, ref_scale = CASES[case]
    ours, ours_ref = _ours(pipe64, image_and_mask, reference_prompt=REF, reference_seed=5, **params)
    z_ref = _z(5, torch.float32).double()  # the free row's noise: randn(seed) in fp32
    theirs, theirs_ref = _theirs(pipe64, image_and_mask, z_ref, early, ref_scale=ref_scale)
    err = max((ours - theirs).abs().max().item(), (ours_ref - theirs_ref).abs().max().item())
    print(f"vsp pipeline {case}: max abs err {err:.2e}")
    assert err < 1e-9
    wrong, _ = _theirs(pipe64, image_and_mask, z_ref, early, ref=1, ref_scale=ref_scale)  # control: row 1 as reference
    assert (ours - wrong).abs().max() > 1e-3
    if early[1]:  # control: the reference guided at the pipeline's scale in the early steps is another image
        _, other_ref = _theirs(pipe64, image_and_mask, z_ref, early, ref_scale=G)
        assert (ours_ref - other_ref).abs().max() > 1e-3
    plain = _run(pipe64, image_and_mask, MAIN, torch.cat([_z(1), _z(2)]), n=2)
    assert (ours - plain).abs().max() > 1e-3  # control: it acts


def test_untouched_rows_and_sites_are_bit_identical(pipe64, image_and_mask):
    """Against the same run with the swap gated off: the reference rows everywhere, the main rows at every
    attention module before the first swapped site (first UNet call), and the reference's final latent."""
    from diffusers.models.attention_processor import Attention

    def record(**params):
        seen, hooks = {}, []
        for name, module in pipe64.unet.named_modules():
            if isinstance(module, Attention):
                hooks.append(module.register_forward_hook(
                    lambda m, a, out, name=name: seen.setdefault(name, out.detach().clone())))
        try:
            return _ours(pipe64, image_and_mask, reference_prompt=REF, advanced_sampling=False, **params), seen
        finally:
            for h in hooks:
                h.remove()

    (on, on_ref), on_out = record()
    with pytest.warns(RunWarning, match="will not act"):
        (off, off_ref), off_out = record(start_step=STEPS)  # planned, never due
    assert torch.equal(on_ref, off_ref) and (on - off).abs().max() > 1e-3
    swapped = [s.name for s in vsp.default_sites(describe_sites(pipe64.unet))]
    order = list(on_out)  # modules in the order of their first call
    refs = [4, 5]  # layout: u_0, u_1, c_0, c_1, then the reference's u, c
    for i, name in enumerate(order):
        assert torch.equal(on_out[name][refs], off_out[name][refs]), name
        assert torch.equal(on_out[name], off_out[name]) == (i < order.index(swapped[0])), name


@pytest.fixture
def reference(tmp_path):
    path = tmp_path / "style.png"
    Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(7)) * 255).byte().numpy()).save(path)
    return path


def test_real_reference_and_the_early_guidance_match_the_authors_loop(pipe64, image_and_mask, reference):
    params = {"reference_image": str(reference), "reference_prompt": REF, "advanced_sampling": True, "early_steps": 2}
    ours, _ = _ours(pipe64, image_and_mask, **params)
    with torch.no_grad():
        pixels = pipe64.image_processor.preprocess(Image.open(reference).convert("RGB"), height=64, width=64)
        clean = pipe64.vae.encode(pixels.double()).latent_dist.mode() * pipe64.vae.config.scaling_factor
    theirs, _ = _theirs(pipe64, image_and_mask, _z(9), (20.0, 2), clean=clean)
    err = (ours - theirs).abs().max().item()
    print(f"vsp pipeline real reference: max abs err {err:.2e}")
    assert err < 1e-9
    for early in [(20.0, 0), (20.0, 1), (12.0, 2)]:  # controls: the schedule is what they do, no more, no less
        assert (ours - _theirs(pipe64, image_and_mask, _z(9), early, clean=clean)[0]).abs().max() > 1e-3, early
    fixed, _ = _theirs(pipe64, image_and_mask, _z(9), (20.0, 2), clean=clean, fresh=False)
    assert (ours - fixed).abs().max() > 1e-3  # control: their noise is drawn anew every step


def test_colour_calibration_matches_their_ddim_step(pipe64, image_and_mask, reference):
    """Their window 150 > t > 100 moved to 300 > t > 200 so that one of the 4 steps (t = 251) falls in it."""
    params = {"reference_image": str(reference), "reference_prompt": REF, "color_cal_start_t": 300.0,
              "color_cal_window": 100.0}
    ours, _ = _ours(pipe64, image_and_mask, **params)
    with torch.no_grad():
        pixels = pipe64.image_processor.preprocess(Image.open(reference).convert("RGB"), height=64, width=64)
        clean = pipe64.vae.encode(pixels.double()).latent_dist.mode() * pipe64.vae.config.scaling_factor
    theirs, _ = _theirs(pipe64, image_and_mask, _z(9), clean=clean, calibrate=(300, 200))
    err = (ours - theirs).abs().max().item()
    print(f"vsp colour calibration: max abs err {err:.2e}")
    assert err < 1e-9
    uncalibrated, _ = _theirs(pipe64, image_and_mask, _z(9), clean=clean)
    assert (ours - uncalibrated).abs().max() > 1e-3  # control: the calibration acted
    off, _ = _ours(pipe64, image_and_mask, **params, color_calibration=False)
    assert (off - uncalibrated).abs().max() < 1e-9  # and switching it off is their plain loop


def test_early_guidance_op_and_its_gate():
    ops = vsp.attnctl_plan(ROLE, vsp.SPEC, vsp.VisualStylePromptingParams(reference_prompt="x"), SiteTable([SITE]))
    (early,) = [op for op in ops if isinstance(op, vsp.EarlyGuidance)]
    layout = BatchLayout.for_pipeline(1, 2).with_rows([(ROLE, False, None)])
    eps = torch.randn(len(layout), 4, 2, 2, generator=torch.Generator().manual_seed(0))
    ctx = type("Ctx", (), {"state": type("S", (), {"layout": layout})()})()
    u, c = eps[[0, 1]], eps[[2, 3]]
    assert torch.allclose(early.combine(eps, ctx), u + 20.0 * (c - u))
    gate = early.gates[0]
    assert [gate(type("S", (), {"step_index": i})()) for i in range(5)] == [True] * 3 + [False] * 2
    for params in [{"advanced_sampling": False}, {"early_steps": 0}, {"reference_image": "a.png",
                                                                         "reference_prompt": None}]:
        assert vsp.VisualStylePromptingParams(**{"reference_prompt": "x", **params}).advanced is False


# ----------------------------------------------------------------------------- sites and parameters
def test_default_sites_are_the_authors_layers():
    from attnctl.testing import build_tiny_inpaint_pipeline
    from attnctl.testing.tiny import tiny_sdxl_model

    sdxl = vsp.default_sites(describe_sites(tiny_sdxl_model().unet))
    # their ACTIVATE_LAYER_CANDIDATE[128:140]: up_blocks.1, attentions 0-2, transformer blocks 0-1 (attn1 of each)
    assert [s.name for s in sdxl] == [f"up_blocks.1.attentions.{a}.transformer_blocks.{b}.attn1"
                                      for a in range(3) for b in range(2)]
    sd_sites = describe_sites(build_tiny_inpaint_pipeline(0).unet)
    assert [s.name.split(".transformer")[0] for s in vsp.default_sites(sd_sites)] == [
        f"up_blocks.3.attentions.{a}" for a in range(3)]
    _, ops = planned(sd_sites, sites="self@mid,self@up/1")  # the SD 1.5 port's mid block + up_blocks.3
    assert [op.site.key for op in ops] == ["self[6]", "self[13]", "self[14]", "self[15]"]


def test_bad_parameters_are_named(tiny_pipe, tmp_path):
    sites = describe_sites(tiny_pipe.unet)
    for bad, message in [({"reference_prompt": None}, "strategies.v: give reference_prompt .* or reference_image"),
                         ({"reference_prompt": " ", "reference_image": ""}, "give reference_prompt"),
                         ({"early_steps": -1}, "early_steps >= 0"), ({"early_guidance_scale": float("nan")}, "finite"),
                         ({"start_step": 3, "end_step": 3}, "start_step < end_step"),
                         ({"sites": "cross[-3:]"}, "cross-attention"),
                         ({"sites": "self@nowhere"}, "neither a stage nor a named site set")]:
        with pytest.raises(ConfigError, match=message):
            attnctl.compile_plan({"strategies": {"v": {"strategy": vsp.NAME, "reference_prompt": "x", **bad}}},
                                 sites, StrategyManager())
    with pytest.raises(InputError, match="strategies.v.reference_image: cannot read .*nope.png"):
        attnctl.attach(tiny_pipe, {"strategies": {"v": {"strategy": vsp.NAME,
                                                        "reference_image": str(tmp_path / "nope.png")}}},
                       StrategyManager())
