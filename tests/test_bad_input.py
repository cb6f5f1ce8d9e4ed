"""Every bad input ends in one clear error line (exit code 2), never a traceback."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from attnctl.cli import main
# import the pipelines now: transformers logs import-time notes through a handler bound to the
# stderr of that moment, which must not be a test's (soon closed) capsys stream
from diffusers import AutoPipelineForInpainting, StableDiffusionInpaintPipeline  # noqa: F401,E402
from harmonpaint_recipe.inputs import InputWarning, prepare_inputs


def cli(capsys, files, *extra, image="img.png", mask="mask.png", out="out.png", recipe="sdi"):
    argv = ["inpaint", "--recipe", recipe, "--image", str(files / image), "--mask", str(files / mask),
            "--prompt", "a cat", "--out", str(files / out), "--seed", "0", *extra]
    rc = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return rc, captured.err


def error(capsys, files, *extra, **kw) -> str:
    rc, err = cli(capsys, files, *extra, **kw)
    assert rc == 2
    prefix = "attnctl inpaint: error: "
    assert prefix in err
    return err[err.index(prefix) + len(prefix):].strip()


def test_missing_file(capsys, files):
    assert error(capsys, files, image="nope.png") == f"image file '{files / 'nope.png'}' does not exist; check the path"


def test_corrupt_image(capsys, files):
    (files / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    assert error(capsys, files, image="bad.png") == (
        f"image file '{files / 'bad.png'}' cannot be read as an image; "
        "it may be corrupt or not an image - re-export it as PNG or JPEG")


def test_mask_size_mismatch_hints_at_resize_mask(capsys, files):
    Image.new("L", (32, 32), 255).save(files / "small.png")
    assert error(capsys, files, mask="small.png") == (
        "mask is 32x32 but the image is 64x64; give a mask of the same size, or pass --resize-mask "
        "(resize_mask=True) to resize it (nearest)")


def test_image_side_not_multiple_of_8(capsys, files):
    Image.new("RGB", (60, 64)).save(files / "odd.png")
    Image.new("L", (60, 64), 255).save(files / "oddmask.png")
    assert error(capsys, files, image="odd.png", mask="oddmask.png") == (
        "image is 60x64, but Stable Diffusion needs width and height that are multiples of 8; "
        "crop or resize it, e.g. to 56x64")


def test_empty_mask(capsys, files):
    Image.new("L", (64, 64), 100).save(files / "empty.png")  # 100/255 < 0.5: nothing to inpaint
    assert error(capsys, files, mask="empty.png") == (
        "mask is empty: no pixel is >= 0.5, so there is nothing to inpaint; "
        "paint the region to inpaint white (255) on black")


def test_unknown_recipe(capsys, files):
    assert error(capsys, files, recipe="harmonpant").startswith(
        "unknown recipe 'harmonpant' (did you mean 'harmonpaint'?); shipped recipes: attend-excite, attentive-eraser, harmonpaint, ")


def test_unknown_override_key(capsys, files):
    assert error(capsys, files, "sampler.stepz=3") == (
        "unknown recipe key 'sampler.stepz' (did you mean 'steps'?); "
        "valid keys of sampler: scheduler, steps, guidance_scale, strength, negative_prompt, positive_prompt")


def test_wrong_override_type(capsys, files):
    assert error(capsys, files, "sampler.steps=many") == "sampler.steps: expected int, got str 'many'"


def test_not_an_override(capsys, files):
    assert error(capsys, files, "stray") == (
        "unexpected argument 'stray': overrides are key=value (e.g. sampler.steps=20); "
        "quote prompts with spaces: --prompt \"a red car\"")


def test_unknown_strategy_name(capsys, files):
    msg = error(capsys, files, "strategies.sams.strategy=region_mask2", recipe="harmonpaint")
    assert msg.startswith("unknown strategy 'region_mask2' in strategies.sams (did you mean 'region_mask'?); "
                          "available strategies: ")


def test_selector_matching_nothing(capsys, files):
    msg = error(capsys, files, "model.pretrained=tiny", "strategies.sams.sites=self[40:]", recipe="harmonpaint")
    assert msg.startswith("selector term 'self[40:]' matches no attention site of this model. Available sites:")
    assert not (files / "out.png").exists()


def test_out_equal_to_input_is_refused(capsys, files):
    before = (files / "img.png").read_bytes()
    assert error(capsys, files, out="img.png") == (
        f"the output would overwrite the input '{files / 'img.png'}'; attnctl never overwrites inputs - choose another --out")
    assert (files / "img.png").read_bytes() == before


def test_missing_model_points_at_a_local_folder(capsys, files):
    msg = error(capsys, files, f"model.pretrained={files / 'no-such-model'}")
    assert msg == (f"model.pretrained='{files / 'no-such-model'}' is not a diffusers pipeline folder (no model_index.json); "
                   "point it at a folder saved with save_pretrained, e.g. model.pretrained=/path/to/stable-diffusion-inpainting")


def test_mask_over_90_percent_warns():
    image = Image.new("RGB", (64, 64))
    mask = Image.new("L", (64, 64), 255)
    with pytest.warns(InputWarning) as record:
        prepare_inputs(image, mask)
    assert [str(w.message) for w in record] == [
        "mask covers 100% of the image (> 90%): the unmasked style source is too small and harmonization "
        "will be weak (paper Fig. 11)"]


def test_adjusted_mask_runs_and_says_so_once(capsys, files):
    """RGB, non-binary, wrong-size mask with --resize-mask, into a folder that does not exist yet."""
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    rgb[8:24, 8:24] = 200
    rgb[8:24, 4:8] = 90  # grey, below 0.5: not inpainted
    Image.fromarray(rgb).save(files / "rgbmask.png")
    rc, err = cli(capsys, files, "--resize-mask", "model.pretrained=tiny", "sampler.steps=2",
                  mask="rgbmask.png", out="new/dir/out.png")
    assert rc == 0, err
    lines = [line for line in err.splitlines() if line.startswith("attnctl inpaint: warning: ")]
    assert lines == [
        "attnctl inpaint: warning: mask resized from 32x32 to 64x64 (nearest)",
        "attnctl inpaint: warning: mask has mode RGB; converted to one channel (L)",
        "attnctl inpaint: warning: mask is not binary; binarized at 0.5 (white = inpaint)",
    ]
    assert (files / "new/dir/out.png").is_file() and (files / "new/dir/out.json").is_file()


def test_prepare_inputs_binarizes_at_half():
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, :16] = 127   # 0.498 -> 0
    mask[:, 16:32] = 128  # 0.502 -> 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        prepared = prepare_inputs(Image.new("RGB", (64, 64)), Image.fromarray(mask))
    assert prepared.mask_array[:, :16].sum() == 0 and prepared.mask_array[:, 16:32].min() == 1.0
    assert set(np.unique(np.asarray(prepared.mask))) == {0, 255}
