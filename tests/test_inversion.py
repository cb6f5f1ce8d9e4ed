"""Rows driven along a DDIM inversion of a real image (``RowSpec(driver="inverted")``).

The reference is the inversion written out as MasaCtrl's ``invert``/``next_step`` compute
it, with the stock UNet after detaching: the latents the run feeds its inverted rows must be
that trajectory, step by step, and ``start_main`` must start the main rows where it ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import attnctl
from attnctl.errors import ConfigError
from attnctl.inversion import trajectory_index
from attnctl.plugins import StrategyManager
from attnctl.row_inputs import encode_image
from attnctl.rows import RowOp, RowSpec

sys.path.insert(0, str(Path(__file__).parent))
from reference_inversion import literal_inversion  # noqa: E402
from toy_strategies import FactoryPlugin  # noqa: E402

MAIN, SOURCE = "a red cube", "a blue ball"
STEPS = 4


def _source_image() -> Image.Image:
    rng = np.random.RandomState(7)
    return Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))


def _attach(pipe, spec: RowSpec):
    plugin = FactoryPlugin(lambda inst, sites: [RowOp(inst, row=spec)])
    return attnctl.attach(pipe, {"strategies": {"rows": {"strategy": "toy_ops"}}},
                          manager=StrategyManager(plugins=[plugin], autoload=False))


def _run(pipe, spec, image_and_mask, latents):
    """Run with ``spec``'s rows; returns every UNet input the model saw (after attnctl's hook) and the output."""
    seen = []
    ctl = _attach(pipe, spec)
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(((a[0] if a else kw["sample"]).clone(), kw.get("encoder_hidden_states"))),
        with_kwargs=True)
    image, mask = image_and_mask
    layout = attnctl.BatchLayout.for_call(pipe, prompt=MAIN, guidance_scale=7.5)
    with ctl.run(layout, mask=mask) as state:
        out = pipe(prompt=MAIN, image=image, mask_image=mask, num_inference_steps=STEPS, guidance_scale=7.5,
                   output_type="latent", latents=latents, generator=torch.Generator().manual_seed(0)).images
    hook.remove()
    ctl.detach()
    return seen, out, state


@pytest.fixture
def ddim_pipe(tiny_pipe):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    return tiny_pipe


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_inverted_rows_follow_the_literal_inversion(ddim_pipe, image_and_mask, guidance):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = RowSpec("source", prompt=SOURCE, driver="inverted", image=_source_image(), inversion_guidance=guidance)
    seen, _, state = _run(ddim_pipe, spec, image_and_mask, z)
    calls = 2 if guidance > 1 else 1
    assert state.report()["inversions"] == {"source": {"unet_calls": STEPS, "rows_per_call": calls}}
    inversion, main = seen[:STEPS], seen[STEPS:]
    assert [s.shape[0] for s, _ in inversion] == [calls] * STEPS and [s.shape[0] for s, _ in main] == [4] * STEPS
    extra = main[0][0][1:2, 4:]  # the partner (main cond) row's mask and masked-image channels
    assert torch.equal(inversion[0][0][:, 4:], extra.expand(calls, -1, -1, -1))
    z0 = encode_image(ddim_pipe, _source_image(), (8, 8), "source")
    expected = literal_inversion(ddim_pipe, z0, extra, SOURCE, guidance)
    for i in range(STEPS):
        torch.testing.assert_close(main[i][0][2:4, :4], expected[STEPS - i].expand(2, -1, -1, -1),
                                   rtol=0, atol=1e-5)
    # control: the inverted image is not the pipeline's noise, and each step takes a different latent
    assert not torch.allclose(main[0][0][2, :4], z[0], atol=1e-2)
    assert not torch.allclose(main[0][0][2, :4], main[1][0][2, :4], atol=1e-3)


def test_start_main_starts_the_main_rows_from_the_inverted_latent(ddim_pipe, image_and_mask):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = RowSpec("source", prompt=SOURCE, driver="inverted", image=_source_image(), start_main=True)
    seen, out, _ = _run(ddim_pipe, spec, image_and_mask, z)
    z_T = seen[STEPS][0][2:3, :4]
    assert torch.equal(seen[STEPS][0][:2, :4], z_T.expand(2, -1, -1, -1))
    # the reference: the stock pipeline started from that latent, with the inverted rows beside it as before
    plain = RowSpec("source", prompt=SOURCE, driver="inverted", image=_source_image())
    _, from_z_T, _ = _run(ddim_pipe, plain, image_and_mask, z_T.clone())
    torch.testing.assert_close(out, from_z_T, rtol=0, atol=0)
    _, from_noise, _ = _run(ddim_pipe, plain, image_and_mask, z)
    assert not torch.allclose(out, from_noise, atol=1e-3)  # control: the start did change the run


def test_rows_that_do_not_follow_start_from_the_inversion_and_are_denoised(ddim_pipe, image_and_mask):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = RowSpec("source", prompt=SOURCE, driver="inverted", image=_source_image(), follow_inversion=False,
                   start_main=True)
    seen, _, _ = _run(ddim_pipe, spec, image_and_mask, z)
    main = seen[STEPS:]
    followed, _, _ = _run(ddim_pipe, RowSpec("source", prompt=SOURCE, driver="inverted", image=_source_image()),
                          image_and_mask, z)
    # step 0: every row at the inverted z_T (MasaCtrl: both prompts start from start_code)
    assert torch.equal(main[0][0][:, :4], followed[STEPS][0][2:3, :4].expand(4, -1, -1, -1))
    # later steps: the source row is its own denoised latent, not the inversion's
    assert not torch.allclose(main[1][0][2, :4], followed[STEPS + 1][0][2, :4], atol=1e-3)
    assert torch.equal(main[1][0][2, :4], main[1][0][3, :4])  # both branches' rows: one latent


def test_trajectory_index_copies_the_offset_callback():
    # offset 0 is the plain trajectory: step i takes z_{n-i}
    assert [trajectory_index(i, 10) for i in range(10)] == [10 - i for i in range(10)]
    # StyleAligned's offset 5: zts[5] at step 0, then zts[max(6, i)] (zts = the list reversed)
    assert [10 - trajectory_index(i, 10, 5) for i in range(10)] == [5, 6, 6, 6, 6, 6, 6, 7, 8, 9]
    with pytest.raises(ConfigError, match="past the run"):
        trajectory_index(0, 4, 5)


def test_inversion_settings_are_checked(ddim_pipe, image_and_mask):
    with pytest.raises(ConfigError, match="inverted driver needs clean"):
        RowSpec("x", driver="inverted")
    with pytest.raises(ConfigError, match="settings of the inverted driver"):
        RowSpec("x", driver="free", start_main=True)
    with pytest.raises(ConfigError, match="settings of the inverted driver"):
        RowSpec("x", driver="noised", clean=torch.zeros(1, 4, 8, 8), follow_inversion=False)
    with pytest.raises(ConfigError, match=">= 0"):
        RowSpec("x", driver="inverted", clean=torch.zeros(1, 4, 8, 8), inversion_offset=-1)
    from diffusers import EulerDiscreteScheduler

    ddim_pipe.scheduler = EulerDiscreteScheduler.from_config(ddim_pipe.scheduler.config)
    spec = RowSpec("source", driver="inverted", image=_source_image())
    with pytest.raises(ConfigError, match="sampler.scheduler=ddim"):
        _run(ddim_pipe, spec, image_and_mask, None)


def test_sdxl_inversion_uses_the_pooled_text(image_and_mask):
    from diffusers import DDIMScheduler

    from attnctl.testing.tiny import tiny_sdxl_model

    pipe = tiny_sdxl_model()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pooled = []  # this hook runs before attnctl's: the pipeline's first call, then the inversion's inside it
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: pooled.append(kw["added_cond_kwargs"]["text_embeds"].clone()), with_kwargs=True)
    spec = RowSpec("source", prompt=SOURCE, driver="inverted", image=_source_image(), inversion_guidance=2.0)
    seen, out, _ = _run(pipe, spec, image_and_mask, None)
    hook.remove()
    # the unconditional text is the pipeline's own for an empty negative prompt: zeros on SDXL (as StyleAligned's)
    source = pipe.encode_prompt(prompt=SOURCE, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(pooled[1], torch.cat([torch.zeros_like(source[2]), source[2]]))
    assert torch.equal(seen[0][1], torch.cat([torch.zeros_like(source[0]), source[0]]))
    assert torch.isfinite(out).all()


def test_record_ops_keep_what_the_inversion_computes_by_step(ddim_pipe, image_and_mask):
    """An op planned for the record pass sees each inversion call with the step index of its timestep;
    what it keeps is what the stock UNet computes along the literal inversion."""
    from attnctl.ops import RECORD, ProjectionOp

    class KeepKeys(ProjectionOp):
        def project(self, call):
            call.state.store(self.strategy).put(("key", call.state.step_index), call.own_key.clone())

    site_name = []

    def make(inst, sites):
        site = sites.of_kind("self")[0]
        site_name.append(site.name)
        return [RowOp(inst, row=RowSpec("source", prompt=SOURCE, driver="inverted", image=_source_image())),
                KeepKeys(inst, site=site, passes=frozenset({RECORD}))]

    ctl = attnctl.attach(ddim_pipe, {"strategies": {"rows": {"strategy": "toy_ops"}}},
                         manager=StrategyManager(plugins=[FactoryPlugin(make)], autoload=False))
    seen = []
    hook = ddim_pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["sample"]).clone()),
                                                    with_kwargs=True)
    image, mask = image_and_mask
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with ctl.run(attnctl.BatchLayout.for_call(ddim_pipe, prompt=MAIN, guidance_scale=7.5), mask=mask) as state:
        ddim_pipe(prompt=MAIN, image=image, mask_image=mask, num_inference_steps=STEPS, guidance_scale=7.5,
                  output_type="latent", latents=z, generator=torch.Generator().manual_seed(0))
    hook.remove()
    ctl.detach()
    store = state.store("rows")
    timesteps = list(ddim_pipe.scheduler.timesteps)
    assert sorted(k[1] for k in store.keys()) == list(range(STEPS))  # one call per step, by its step index
    # the reference: the literal inversion on the stock UNet, the same site's keys captured per call
    attn = ddim_pipe.unet.get_submodule(site_name[0])
    keys = []
    capture = attn.to_k.register_forward_hook(lambda m, a, out: keys.append(out.detach().clone()))
    z0 = encode_image(ddim_pipe, _source_image(), (8, 8), "source")
    expected = literal_inversion(ddim_pipe, z0, seen[-1][1:2, 4:], SOURCE, 1.0)
    capture.remove()
    for k, t in zip(keys, reversed(timesteps)):
        step = timesteps.index(t)
        ours = store.get(("key", step))  # [1, heads, N, d]
        torch.testing.assert_close(ours.transpose(1, 2).reshape(k.shape), k, rtol=0, atol=1e-5)
    # the record op only read: the trajectory the rows follow is still the literal inversion
    for i in range(STEPS):
        torch.testing.assert_close(seen[STEPS + i][2:4, :4], expected[STEPS - i].expand(2, -1, -1, -1), rtol=0, atol=1e-5)
