"""Run state: explicit CFG layouts, masks at every grid, step bookkeeping."""

from __future__ import annotations

import pytest
import torch

from attnctl import BatchLayout
from attnctl.plan import Plan
from attnctl.run_state import RunState
from attnctl.sites import describe_sites
from attnctl.testing import build_unet


def test_layout_with_cfg_and_several_images_per_prompt():
    layout = BatchLayout.for_pipeline(num_prompts=2, num_images_per_prompt=2, cfg=True)
    assert layout.branches == ("uncond",) * 4 + ("cond",) * 4
    assert layout.images == (0, 1, 2, 3, 0, 1, 2, 3)
    assert layout.prompts == (0, 0, 1, 1, 0, 0, 1, 1)
    assert layout.cond_rows == (4, 5, 6, 7)


def test_layout_without_cfg_has_no_uncond_rows():
    layout = BatchLayout.for_pipeline(num_prompts=3, num_images_per_prompt=1, cfg=False)
    assert layout.branches == ("cond",) * 3 and layout.cond_rows == (0, 1, 2)


@pytest.fixture(scope="module")
def sites():
    return describe_sites(build_unet("sd15-inpaint", device="meta"))


def test_masks_at_every_grid_follow_the_pipeline(sites):
    pixel = torch.zeros(512, 768)
    pixel[100:300, 200:500] = 0.7  # non-binary: binarized at 0.5
    state = RunState(Plan(sites), BatchLayout.for_pipeline(1), mask=pixel)
    state.begin_step(981.0, latent_hw=(64, 96))
    latent = torch.nn.functional.interpolate((pixel >= 0.5).float()[None, None], size=(64, 96), mode="nearest")
    for level, grid in [(0, (64, 96)), (1, (32, 48)), (2, (16, 24)), (3, (8, 12))]:
        m = state.mask(level)
        assert m.shape == (1, grid[0] * grid[1])
        expected = torch.nn.functional.interpolate(latent, size=grid, mode="nearest").flatten(1)
        assert torch.equal(m, expected)
        assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_row_masks_follow_images_and_cycle_like_diffusers(sites):
    masks = torch.zeros(2, 1, 8, 8)
    masks[0, :, :4] = 1
    masks[1, :, 4:] = 1
    layout = BatchLayout.for_pipeline(num_prompts=1, num_images_per_prompt=3, cfg=True)
    state = RunState(Plan(sites), layout, mask=masks)
    state.begin_step(500.0, latent_hw=(8, 8))
    rows = state.row_mask(sites[0])
    # image i uses mask i % 2, for both CFG halves
    for r, image in enumerate(layout.images):
        assert torch.equal(rows[r], masks[image % 2].flatten())
    with state.guidance_pass(layout.cond_rows):
        assert state.rows == (3, 4, 5)
        assert torch.equal(state.row_mask(sites[0]), rows[3:])


def test_step_index_and_normalized_time(sites):
    state = RunState(Plan(sites), BatchLayout.for_pipeline(1), timesteps=[981, 961, 941], num_train_timesteps=1000)
    state.begin_step(961.0, latent_hw=(8, 8))
    assert state.step_index == 1 and state.t_norm == pytest.approx(0.961)


def test_bad_mask_shape():
    from attnctl.errors import InputError

    with pytest.raises(InputError, match="mask must have shape"):
        RunState(Plan(describe_sites(build_unet("sd15-inpaint", device="meta"))), BatchLayout.for_pipeline(1),
                 mask=torch.zeros(1, 3, 8, 8))
