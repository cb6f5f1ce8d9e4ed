"""Rows strategies add to the batch (``attnctl.rows``): layout, conditioning, drivers, outputs.

The reference for an added row is the stock pipeline called with both prompts at once
(``prompt=[main, added]``, both images starting from the same latent): that is the same
computation row by row, in a batch of the same size. CPU GEMM kernels block differently
for other batch sizes (the UNet's time embedding already differs in the last bit between
a batch of 2 and of 4), so the equal-size batch is what can be bit-identical; against a
run of the row alone the test checks a tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attnctl
from attnctl.errors import ConfigError
from attnctl.plugins import StrategyManager
from attnctl.rows import RowOp, RowSpec

sys.path.insert(0, str(Path(__file__).parent))
from toy_strategies import FactoryPlugin  # noqa: E402

MAIN, SOURCE = "a red cube", "a blue ball"
STEPS = 3


def _mask() -> np.ndarray:
    m = np.zeros((64, 64), dtype=np.uint8)
    m[16:48, 20:44] = 255
    return m


def _kwargs(image_and_mask, prompt, latents, **extra):
    image, mask = image_and_mask
    return dict(prompt=prompt, image=image, mask_image=mask, num_inference_steps=STEPS, guidance_scale=7.5,
                output_type="latent", latents=latents, generator=torch.Generator().manual_seed(0), **extra)


def _attach(pipe, *specs: RowSpec):
    plugin = FactoryPlugin(lambda inst, sites: [RowOp(inst, row=spec) for spec in specs])
    return attnctl.attach(pipe, {"strategies": {"rows": {"strategy": "toy_ops"}}},
                          manager=StrategyManager(plugins=[plugin], autoload=False))


def _run(ctl, pipe, kwargs, prompt=MAIN):
    layout = attnctl.BatchLayout.for_call(pipe, prompt=prompt, guidance_scale=7.5,
                                          num_images_per_prompt=kwargs.get("num_images_per_prompt", 1))
    with ctl.run(layout, mask=torch.from_numpy(_mask())) as state:
        out = pipe(**kwargs).images
    return out, state


@pytest.fixture
def ddim_pipe(tiny_pipe):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    return tiny_pipe


def test_free_row_is_its_own_image_and_main_is_untouched(ddim_pipe, image_and_mask):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    both = ddim_pipe(**_kwargs(image_and_mask, [MAIN, SOURCE], torch.cat([z, z]))).images
    ctl = _attach(ddim_pipe, RowSpec("source", prompt=SOURCE, output=True))
    main, state = _run(ctl, ddim_pipe, _kwargs(image_and_mask, MAIN, z))
    ctl.detach()
    assert main.shape == (1, 4, 8, 8)  # the pipeline gets its own image only
    assert torch.equal(main[0], both[0])
    assert torch.equal(state.row_outputs["source"][0], both[1])
    assert state.layout.roles == ("main", "main", "source", "source")
    assert state.report()["rows"] == {"source": 2}
    # against the row run alone (a batch of 2, not 4): the same up to kernel blocking
    alone = ddim_pipe(**_kwargs(image_and_mask, SOURCE, z)).images
    assert (state.row_outputs["source"] - alone).abs().max() < 1e-4


def test_rows_per_image_and_seeded_noise(ddim_pipe, image_and_mask):
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctl = _attach(ddim_pipe, RowSpec("source", prompt=SOURCE, output=True),
                  RowSpec("ref", prompt=SOURCE, per_image=False, noise_seed=5, output=True))
    kwargs = _kwargs(image_and_mask, MAIN, z, num_images_per_prompt=2)
    main, state = _run(ctl, ddim_pipe, kwargs)
    ctl.detach()
    layout = state.layout
    # roles follow the main rows in role-name order; each in the main rows' branch order
    assert layout.rows_of("ref") == (4, 5) and layout.rows_of("source") == (6, 7, 8, 9)
    assert [layout.partner(r, "source") for r in layout.main_rows] == [6, 7, 8, 9]
    assert [layout.partner(r, "ref") for r in layout.main_rows] == [4, 4, 5, 5]
    assert state.row_outputs["source"].shape == (2, 4, 8, 8) and state.row_outputs["ref"].shape == (1, 4, 8, 8)
    # the seeded reference starts from its own noise: it is not the first image's source
    assert not torch.allclose(state.row_outputs["ref"][0], state.row_outputs["source"][0])
    stock = ddim_pipe(**_kwargs(image_and_mask, MAIN, z, num_images_per_prompt=2)).images
    assert (main - stock).abs().max() < 1e-4


def test_shared_row_follows_the_main_latent(ddim_pipe, image_and_mask):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = []

    class Record(attnctl.ProjectionOp):
        def project(self, call):
            rows = call.rows_of("copy")
            if rows:
                seen.append(torch.equal(call.take(call.query, "copy")[call.rows_of("main")],
                                        call.query[call.rows_of("copy")]))

    plugin = FactoryPlugin(lambda inst, sites: [RowOp(inst, row=RowSpec("copy", driver="shared")),
                                                Record(inst, site=sites.of_kind("self")[0])])
    ctl = attnctl.attach(ddim_pipe, {"strategies": {"rows": {"strategy": "toy_ops"}}},
                         manager=StrategyManager(plugins=[plugin], autoload=False))
    main, _ = _run(ctl, ddim_pipe, _kwargs(image_and_mask, MAIN, z))
    ctl.detach()
    # same latent, same text, same conditioning: the copy's first queries equal the main rows'
    assert seen and all(seen)


def test_sdxl_rows_carry_their_pooled_text(image_and_mask):
    from diffusers import DDIMScheduler

    from attnctl.testing.tiny import tiny_sdxl_model

    pipe = tiny_sdxl_model()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # the reference: each prompt encoded alone (as the run does), denoised side by side in one batch
    main_text = pipe.encode_prompt(prompt=MAIN, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    src_text = pipe.encode_prompt(prompt=SOURCE, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    kwargs = _kwargs(image_and_mask, None, torch.cat([z, z]))
    both = pipe(**kwargs, prompt_embeds=torch.cat([main_text[0], src_text[0]]),
                negative_prompt_embeds=torch.cat([main_text[1], main_text[1]]),
                pooled_prompt_embeds=torch.cat([main_text[2], src_text[2]]),
                negative_pooled_prompt_embeds=torch.cat([main_text[3], main_text[3]])).images
    ctl = _attach(pipe, RowSpec("source", prompt=SOURCE, output=True))
    main, state = _run(ctl, pipe, _kwargs(image_and_mask, MAIN, z))
    ctl.detach()
    assert torch.equal(main[0], both[0])
    assert torch.equal(state.row_outputs["source"][0], both[1])


def test_rows_are_refused_with_pag_and_roles_must_be_unique(ddim_pipe):
    with pytest.raises(ConfigError, match="both add rows with the role 'source'"):
        plugin_a = FactoryPlugin(lambda inst, sites: [RowOp(inst, row=RowSpec("source"))])
        attnctl.attach(ddim_pipe, {"strategies": {"a": {"strategy": "toy_ops"}, "b": {"strategy": "toy_ops"}}},
                       manager=StrategyManager(plugins=[plugin_a], autoload=False))
    ctl = _attach(ddim_pipe, RowSpec("source"))
    layout = attnctl.BatchLayout.for_pipeline(1, 1, cfg=True, perturbed=True)
    with pytest.raises(ConfigError, match="perturbed-attention guidance"):
        with ctl.run(layout):
            pass
    ctl.detach()
    with pytest.raises(ConfigError, match="role other than 'main'"):
        RowSpec("main")
    with pytest.raises(ConfigError, match="trajectory driver needs"):
        RowSpec("x", driver="trajectory")
    with pytest.raises(ConfigError, match="clean=<z_0 latent> or image="):
        RowSpec("x", driver="noised")
    with pytest.raises(ConfigError, match="clean=<z_0 latent> or image="):
        RowSpec("x", driver="noised", clean=torch.zeros(1, 4, 8, 8), image="a.png")
    with pytest.raises(ConfigError, match="fresh_noise draws the noise"):
        RowSpec("x", driver="noised", image="a.png", fresh_noise=True, noise=torch.zeros(1, 4, 8, 8))


def test_trajectory_and_noised_drivers_set_the_rows_latent(ddim_pipe, image_and_mask):
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    path = [torch.full((1, 4, 8, 8), float(i)) for i in range(STEPS)]
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    inputs = []

    class Record(attnctl.ProjectionOp):
        def project(self, call):
            inputs.append(call.state.step_index)

    latents = {}

    def make(inst, sites):
        return [RowOp(inst, row=RowSpec("traj", driver="trajectory", trajectory=path)),
                RowOp(inst, row=RowSpec("noisy", driver="noised", clean=clean, noise=noise)),
                Record(inst, site=sites.of_kind("self")[0])]

    plugin = FactoryPlugin(make)
    ctl = attnctl.attach(ddim_pipe, {"strategies": {"rows": {"strategy": "toy_ops"}}},
                         manager=StrategyManager(plugins=[plugin], autoload=False))
    def record(module, args, kwargs):  # runs after attnctl's pre-hook: it sees the batch with the added rows
        latents[len(latents)] = (args[0] if args else kwargs["sample"]).clone()

    hook = ddim_pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    _run(ctl, ddim_pipe, _kwargs(image_and_mask, MAIN, z))
    hook.remove()
    ctl.detach()
    timesteps = ddim_pipe.scheduler.timesteps
    for i in range(STEPS):
        batch = latents[i]
        assert batch.shape[0] == 6  # 2 main + 2 noised + 2 trajectory (roles in name order)
        expected = ddim_pipe.scheduler.add_noise(clean, noise, timesteps[i].reshape(1))
        assert torch.equal(batch[2:4, :4], expected.expand(2, -1, -1, -1))
        assert torch.equal(batch[4:6, :4], path[i].expand(2, -1, -1, -1))  # DDIM: the sample is the UNet input
        assert torch.equal(batch[2:, 4:], batch[[0, 1, 0, 1], 4:])  # mask and masked-image channels of the partner
