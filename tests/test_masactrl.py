"""masactrl (MasaCtrl's mutual self-attention) against naive references written from the authors' equations.

- Site level: the fused ops on random q/k/v for a layout with source rows, against an explicit
  float64 softmax per row (plain: the source's K,V; union: ``[K_s; K_t]``; mask: the literal
  two-softmax blend with ``finfo.min`` fills, including empty foreground/background sets).
- Pipeline level: the tiny inpainting pipeline with DDIM, against the stock pipeline called with
  ``prompt=[source, main]`` from one initial latent (the authors' batch ``[src, tgt]`` per CFG
  half) whose attention processors run the authors' bookkeeping: one counter over every
  attention call (``cur_att_layer // 2`` = block), one over UNet passes (the step), halves
  by ``chunk(2)``, the source = row 0 of each half.
- Composition with region_mask at the same site (the reweight acts on the projected keys).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnctl
from attnctl import ActiveOps, BatchLayout, ConfigError, Site, StrategyManager, describe_sites, select_sites
from attnctl.attention import compute
from attnctl.rows import RowOp
from attnctl.sites import SiteTable
from diffusers.models.attention_processor import AttnProcessor2_0
from reference_attention import make_call, random_case, sams_weights, single_thread, site_masks
from strategies import masactrl

_one_thread = pytest.fixture(autouse=True)(single_thread)

ROLE = "masa"
VARIANTS = masactrl.VARIANTS
SITE = Site("up_blocks.3.attentions.0.transformer_blocks.0.attn1", "self", "up", 0, 0)
TOL = 1e-5
SCALE = 16**-0.5


def softmax_out(q, k, v, fill=None):
    """``softmax(q k^T * SCALE + fill) v`` explicitly in float64 (one row: [h, N, d])."""
    sim = q.double() @ k.double().transpose(-1, -2) * SCALE
    if fill is not None:
        sim = sim + fill
    return sim.softmax(-1) @ v.double()


def naive_site(q, k, v, layout, masks, variant):
    """Every row's output from the equations; ``masks`` [B, HW] is each row's mask at the grid."""
    outs = []
    for r in range(len(layout)):
        s = layout.partner(r, ROLE)
        if s == r:  # the source row: its own self-attention
            outs.append(softmax_out(q[r], k[r], v[r]))
        elif variant == "plain":
            outs.append(softmax_out(q[r], k[s], v[s]))
        elif variant == "union":
            outs.append(softmax_out(q[r], torch.cat([k[s], k[r]], -2), torch.cat([v[s], v[r]], -2)))
        else:  # the authors' fills: sim + mask.masked_fill(mask == 0, min) (adds 1 on kept keys)
            m_s, m_t, low = masks[s].double(), masks[r].double()[:, None], torch.finfo(torch.float64).min
            fg = softmax_out(q[r], k[s], v[s], m_s.masked_fill(m_s == 0, low))
            bg = softmax_out(q[r], k[s], v[s], m_s.masked_fill(m_s == 1, low))
            outs.append(m_t * fg + (1 - m_t) * bg)
    return torch.stack(outs)


def planned(params: dict, sites=SiteTable([SITE])):
    ops = masactrl.attnctl_plan(ROLE, masactrl.SPEC, masactrl.MasaCtrlParams(source_prompt="x", **params), sites)
    return ops[0], list(ops[1:])


def _hand_layout():
    # main image 0 and a source standing beside it with image 1's mask (only a hand-built layout does this)
    return BatchLayout(("uncond", "cond", "uncond", "cond"), (0, 0, 1, 1), (0, 0, 0, 0), ("main", "main", ROLE, ROLE))


SITE_CASES = {
    "cfg-1img": (BatchLayout.for_pipeline(1, 1).with_rows([(ROLE, True, None)]), (8, 8), [(2, 2, 6, 5)]),
    "cfg-2img-nonsquare": (BatchLayout.for_pipeline(1, 2).with_rows([(ROLE, True, None)]), (6, 10),
                           [(1, 3, 5, 9), (0, 0, 3, 4)]),
    "no-cfg": (BatchLayout.for_pipeline(1, 1, cfg=False).with_rows([(ROLE, True, None)]), (8, 8), [(0, 4, 3, 8)]),
    "empty-fg": (_hand_layout(), (8, 8), [(2, 2, 6, 5), (0, 0, 0, 0)]),
    "empty-bg": (_hand_layout(), (8, 8), [(2, 2, 6, 5), (0, 0, 8, 8)]),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(SITE_CASES))
def test_site_ops_match_the_naive_equations(case, variant):
    layout, hw, boxes = SITE_CASES[case]
    mask, q, k, v = random_case(layout, hw, boxes)
    _, call = make_call(SITE, mask, hw, layout, q, k, v, SCALE)
    row, ops = planned({"sites": "self", "variant": variant})
    assert isinstance(row, RowOp) and row.row.role == ROLE and row.row.driver == "free"
    out = compute(call, ActiveOps.of(ops))
    masks = site_masks(mask, hw, hw, list(layout.images))
    ref = naive_site(q, k, v, layout, masks, variant)
    err = (out.double() - ref).abs().max().item()
    print(f"masactrl site {case} {variant}: max abs err {err:.2e}")
    assert out.shape == v.shape and not out.isnan().any() and err <= TOL
    sources = list(layout.rows_of(ROLE))
    plain_src = torch.stack([softmax_out(q[s], k[s], v[s]) for s in sources])
    assert (out[sources].double() - plain_src).abs().max() <= TOL  # the source rows are unchanged
    targets = [r for r in range(len(layout)) if r not in sources]
    assert (out[targets].double() - torch.stack([softmax_out(q[r], k[r], v[r]) for r in targets])).abs().max() > 1e-2


def test_empty_restricted_set_gives_the_uniform_mean():
    """The authors' finfo.min fill over every key is a uniform softmax: queries get the mean of V_s."""
    layout, hw, boxes = SITE_CASES["empty-fg"]
    mask, q, k, v = random_case(layout, hw, boxes)
    _, call = make_call(SITE, mask, hw, layout, q, k, v, SCALE)
    out = compute(call, ActiveOps.of(planned({"sites": "self", "variant": "mask"})[1]))
    fg = site_masks(mask, hw, hw, [0])[0] > 0
    assert torch.allclose(out[0][:, fg], v[2].mean(-2, keepdim=True).expand(-1, int(fg.sum()), -1), atol=TOL)


def test_masactrl_composes_with_region_mask_at_the_same_site():
    """region_mask's W acts on the own keys after the projection (the source's); appended keys keep weight 1;
    the reweights multiply and the map is renormalized once if any asks (the mask variant does)."""
    layout, hw, boxes = SITE_CASES["cfg-2img-nonsquare"]
    mask, q, k, v = random_case(layout, hw, boxes)
    masks = site_masks(mask, hw, hw, list(layout.images))
    for variant in VARIANTS:
        config = {"strategies": {"masa": {"strategy": "masactrl", "source_prompt": "x", "sites": "self",
                                          "variant": variant},
                                 "sams": {"strategy": "region_mask", "sites": "self", "tau": 0.1}}}
        plan = attnctl.compile_plan(config, SiteTable([SITE]), StrategyManager())
        _, call = make_call(SITE, mask, hw, layout, q, k, v, SCALE)
        out = compute(call, ActiveOps.of(plan.site_ops[SITE.name]))
        refs = []
        for r in range(len(layout)):
            s = layout.partner(r, "masa")
            own = r if variant == "union" else s  # the own keys after the projection
            keys, values = k[own].double(), v[own].double()
            if variant == "union" and s != r:  # the source's keys appended (weight 1)
                keys, values = torch.cat([keys, k[s].double()], -2), torch.cat([values, v[s].double()], -2)
            a = (q[r].double() @ keys.transpose(-1, -2) * SCALE).softmax(-1)
            w = sams_weights(masks[r : r + 1], 0.1)[0]  # the row's own mask (= its source's)
            if variant == "mask" and s != r:
                m_t, m_s = masks[r].double()[:, None], masks[s].double()[None, :]
                w = w * (m_t * m_s + (1 - m_t) * (1 - m_s))
            w = torch.cat([w.expand(a.shape[0], -1, -1), torch.ones_like(a[..., w.shape[-1]:])], -1)
            a = w * a
            if variant == "mask":
                a = a / a.sum(-1, keepdim=True)
            refs.append(a @ values)
        err = (out.double() - torch.stack(refs)).abs().max().item()
        print(f"masactrl + region_mask ({variant}): max abs err {err:.2e}")
        assert err <= TOL


# ----------------------------------------------------------------------------- pipeline level
MAIN, SOURCE = "a red cube", "a blue ball"
STEPS = 5


class AuthorsEditor:
    """The authors' control flow for a batch ``[u_src, u_tgt, c_src, c_tgt]``, explicit softmax in float64."""

    def __init__(self, num_calls, variant, start_step, end_step, start_layer, pixel_mask):
        self.num_calls, self.variant, self.mask = num_calls, variant, pixel_mask
        self.steps = range(start_step, end_step or STEPS)
        self.layers = range(start_layer, num_calls // 2)
        self.cur_step = self.cur_att_layer = 0

    def active(self, is_cross: bool) -> bool:
        return not (is_cross or self.cur_step not in self.steps or self.cur_att_layer // 2 not in self.layers)

    def advance(self) -> None:
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_calls:
            self.cur_att_layer, self.cur_step = 0, self.cur_step + 1

    def edit(self, q, k, v, scale):
        return torch.cat([self.half(*x, scale) for x in zip(q.chunk(2), k.chunk(2), v.chunk(2))])

    def half(self, q, k, v, scale):
        """One CFG half ``[src, tgt]``: every row attends to the source (row 0)."""
        ks, vs = k[:1], v[:1]
        if self.variant == "plain":
            return (q @ ks.transpose(-1, -2) * scale).softmax(-1) @ vs
        src = (q[:1] @ ks.transpose(-1, -2) * scale).softmax(-1) @ vs
        if self.variant == "union":
            keys, values = torch.cat([ks, k[1:]], -2), torch.cat([vs, v[1:]], -2)
            return torch.cat([src, (q[1:] @ keys.transpose(-1, -2) * scale).softmax(-1) @ values])
        side = int(q.shape[-2] ** 0.5)  # H = W = sqrt(N), as theirs
        m = F.interpolate(self.mask, (side, side)).flatten().double()
        sim = q[1:] @ ks.transpose(-1, -2) * scale
        low = torch.finfo(sim.dtype).min
        fg = (sim + m.masked_fill(m == 0, low)).softmax(-1) @ vs
        bg = (sim + m.masked_fill(m == 1, low)).softmax(-1) @ vs
        return torch.cat([src, fg * m[:, None] + bg * (1 - m[:, None])])


class EditorProcessor:
    """Every attention module of the copied UNet: the editor's core where it acts, diffusers' own elsewhere."""

    def __init__(self, editor):
        self.editor, self.stock = editor, AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if not self.editor.active(encoder_hidden_states is not None):
            self.editor.advance()
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        b, n, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = q.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2).double() for t in (q, k, v))
        out = self.editor.edit(q, k, v, d**-0.5)
        self.editor.advance()
        out = out.to(hidden_states.dtype).transpose(1, 2).reshape(b, n, attn.heads * d)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


@pytest.fixture
def ddim_pipe(tiny_pipe):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    return tiny_pipe


def _call(pipe, image_and_mask, prompt, latents):
    image, mask = image_and_mask
    eps = []
    hook = pipe.unet.register_forward_hook(lambda module, args, out: eps.append(out[0].detach().clone()))
    try:
        images = pipe(prompt=prompt, image=image, mask_image=mask, num_inference_steps=STEPS, guidance_scale=7.5,
                      output_type="latent", latents=latents, generator=torch.Generator().manual_seed(0)).images
    finally:
        hook.remove()
    return images, eps


PIPE_CASES = {  # variant, start_step, end_step
    "plain": ("plain", 1, None),
    "union-window": ("union", 1, 4),
    "mask": ("mask", 2, None),
}


@pytest.mark.parametrize("case", list(PIPE_CASES))
def test_pipeline_matches_the_authors_processor(ddim_pipe, image_and_mask, case):
    variant, start, end = PIPE_CASES[case]
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pixel = torch.from_numpy(np.array(image_and_mask[1])).float()[None, None] / 255
    stock, stock_eps = _call(ddim_pipe, image_and_mask, [MAIN, SOURCE], torch.cat([z, z]))

    unet = copy.deepcopy(ddim_pipe.unet)
    unet.set_attn_processor(EditorProcessor(AuthorsEditor(32, variant, start, end, 10, pixel)))
    ref_pipe = type(ddim_pipe)(**{**ddim_pipe.components, "unet": unet})
    ref_pipe.set_progress_bar_config(disable=True)
    ref, _ = _call(ref_pipe, image_and_mask, [SOURCE, MAIN], torch.cat([z, z]))  # the authors' [src, tgt]

    params = {"strategy": "masactrl", "source_prompt": SOURCE, "start_step": start, "end_step": end,
              "variant": variant, "keep_source": True}
    with attnctl.attach(ddim_pipe, {"strategies": {ROLE: params}}, StrategyManager()) as ctl:
        with ctl.run(BatchLayout.for_call(ddim_pipe, prompt=MAIN, guidance_scale=7.5), mask=pixel) as state:
            main, eps = _call(ddim_pipe, image_and_mask, MAIN, z)
    source = state.row_outputs[ROLE]
    err_main, err_src = (main - ref[1:]).abs().max().item(), (source - ref[:1]).abs().max().item()
    print(f"masactrl pipeline {case}: main {err_main:.2e}, source {err_src:.2e}, |z| {ref.abs().max():.2f}, "
          f"effect vs stock {(main - stock[:1]).abs().max():.2e}")
    assert err_main <= TOL and err_src <= TOL
    assert (main - stock[:1]).abs().max() > 1e-3  # it acts
    for i in range(STEPS):  # main rows' noise predictions: stock before start_step, edited after
        same = torch.equal(eps[i], stock_eps[i][[0, 2]])
        assert same == (i < start), (i, same)
    if variant == "plain":  # the source's attention is its own: the stock row, bit for bit
        assert torch.equal(source[0], stock[1])
    else:  # (an appended -inf key / the renormalized reweight: the same up to rounding)
        assert (source[0] - stock[1]).abs().max() <= TOL


@pytest.mark.parametrize("follow", [False, True])
def test_real_source_matches_the_authors_real_image_editing(ddim_pipe, image_and_mask, tmp_path, follow):
    """Their playground_real: invert the source with "" (CFG 7.5), start both rows from z_T, denoise the
    source with "" (or, their commented-out option, overwrite it with the inversion's latent of each step)."""
    from reference_inversion import literal_inversion

    from attnctl.row_inputs import encode_image

    source_image = image_and_mask[0].transpose(0)  # mirrored: a real image other than the main one
    source_image.save(tmp_path / "source.png")
    pixel = torch.from_numpy(np.array(image_and_mask[1])).float()[None, None] / 255
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))  # replaced by z_T
    extra = []  # the masked-image latents depend on the generator's draws: taken from a call with given latents
    hook = ddim_pipe.unet.register_forward_pre_hook(lambda m, a, kw: extra.append((a[0] if a else kw["sample"])[1:2, 4:]),
                                                    with_kwargs=True)
    _call(ddim_pipe, image_and_mask, MAIN, noise)
    hook.remove()
    z0 = encode_image(ddim_pipe, source_image, (8, 8), ROLE)
    zs = literal_inversion(ddim_pipe, z0, extra[0], "", 7.5)
    z_T = zs[-1]

    unet = copy.deepcopy(ddim_pipe.unet)
    unet.set_attn_processor(EditorProcessor(AuthorsEditor(32, "plain", 1, None, 10, pixel)))
    ref_pipe = type(ddim_pipe)(**{**ddim_pipe.components, "unet": unet})
    ref_pipe.set_progress_bar_config(disable=True)

    def overwrite(pipe, i, t, kw):  # ref_intermediate_latents: the source at step i+1 is latents_list[-1-(i+1)]
        if i + 1 < STEPS:
            kw["latents"][0] = zs[-2 - i]
        return {"latents": kw["latents"]}

    image, mask = image_and_mask
    ref = ref_pipe(prompt=["", MAIN], image=image, mask_image=mask, num_inference_steps=STEPS, guidance_scale=7.5,
                   output_type="latent", latents=torch.cat([z_T, z_T]), generator=torch.Generator().manual_seed(0),
                   callback_on_step_end=overwrite if follow else None, callback_on_step_end_tensor_inputs=["latents"],
                   ).images
    params = {"strategy": "masactrl", "source_prompt": "", "source_image": str(tmp_path / "source.png"),
              "start_step": 1, "follow_inversion": follow, "keep_source": True}
    with attnctl.attach(ddim_pipe, {"strategies": {ROLE: params}}, StrategyManager()) as ctl:
        with ctl.run(BatchLayout.for_call(ddim_pipe, prompt=MAIN, guidance_scale=7.5), mask=pixel) as state:
            main, _ = _call(ddim_pipe, image_and_mask, MAIN, noise)
    err, size = (main - ref[1:]).abs().max().item(), ref.abs().max().item()
    print(f"masactrl real source (follow={follow}): main {err:.2e}, |z| {size:.2f}")
    assert err <= TOL * size  # relative: the inverted start is larger than unit noise
    if not follow:
        assert (state.row_outputs[ROLE] - ref[:1]).abs().max() <= TOL * size
    # control: the same run from the pipeline's noise is another image
    plain, _ = _call(ref_pipe, image_and_mask, ["", MAIN], torch.cat([noise, noise]))
    assert (main - plain[1:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- parameters and sites
def test_parameters_errors_and_site_counting():
    from attnctl.testing import build_tiny_inpaint_pipeline

    sites = describe_sites(build_tiny_inpaint_pipeline(0).unet)
    default = masactrl.masactrl_sites(masactrl.MasaCtrlParams(source_prompt="x"), sites, "w")
    assert default == select_sites("self[-6:]", sites) == masactrl.masactrl_sites(
        masactrl.MasaCtrlParams(source_prompt="x", start_layer=10), sites, "w")
    assert [s.name.split(".attentions")[0] for s in default] == ["up_blocks.2"] * 3 + ["up_blocks.3"] * 3
    manager = StrategyManager()
    for bad, message in [({"source_prompt": None}, "strategies.m: source_prompt is missing"),
                         ({"source_prompt": " "}, "source_prompt is missing"),
                         ({"variant": "unoin"}, "did you mean 'union'"),
                         ({"sites": "self", "start_layer": 3}, "not both"),
                         ({"end_step": 4}, "start_step < end_step"), ({"end_step": 0, "start_step": 0}, "end_step=0"),
                         ({"start_layer": 16}, "start_layer=16"), ({"sites": "cross[-6:]"}, "cross-attention")]:
        config = {"strategies": {"m": {"strategy": "masactrl", "source_prompt": "x", **bad}}}
        with pytest.raises(ConfigError, match=message):
            attnctl.compile_plan(config, sites, manager)
    plan = attnctl.compile_plan({"strategies": {"m": {"strategy": "masactrl", "source_prompt": "x"}}}, sites, manager)
    assert [spec.role for _, spec in plan.rows] == ["m"] and len(plan.site_ops) == 6


def test_start_layer_uses_the_authors_sdxl_numbers():
    from attnctl.testing.tiny import tiny_sdxl_model

    sites = describe_sites(tiny_sdxl_model().unet)
    picked = masactrl.masactrl_sites(masactrl.MasaCtrlParams(source_prompt="x", start_layer=64), sites, "w")
    assert picked == select_sites("self[-6:]", sites) and {s.stage for s in picked} == {"up"}
