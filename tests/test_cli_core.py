"""The core's commands: strategies, sites, make-tiny-model."""

from __future__ import annotations

from attnctl.cli import main


def test_strategies_lists_the_four_builtins_with_defaults(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    for name in ("region_mask", "kv_bank", "latent_guidance", "timestep_gate"):
        assert f"{name}  [plugin: {name}]" in out
    assert "tau: float = 0.1" in out and "scale: float = 1.4" in out and "read_sites: str = 'cross/4,cross/2'" in out


def test_sites_prints_the_execution_order_table(capsys):
    assert main(["sites", "sd15-inpaint", "--height", "512", "--width", "768"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# sd15-inpaint: sites at 512x768 (latent 64x96)"
    assert lines[7].split()[:4] == ["self[6]", "mid", "level=3", "8x12"]


def test_make_tiny_model_writes_a_loadable_pipeline(tmp_path, capsys):
    from diffusers import StableDiffusionInpaintPipeline

    target = tmp_path / "tiny"
    assert main(["make-tiny-model", str(target)]) == 0
    assert "its images are noise" in capsys.readouterr().out
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(target), safety_checker=None)
    assert pipe.unet.config.in_channels == 9
    assert sorted(p.name for p in (target / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    # a non-empty folder is not overwritten
    assert main(["make-tiny-model", str(target)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_make_tiny_model_sdxl_writes_an_sdxl_pipeline(tmp_path, capsys):
    from diffusers import StableDiffusionXLInpaintPipeline

    from attnctl import describe_sites

    target = tmp_path / "tiny-sdxl"
    assert main(["make-tiny-model", str(target), "--sdxl"]) == 0
    assert "StableDiffusionXLInpaintPipeline.from_pretrained" in capsys.readouterr().out
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(str(target))
    sites = describe_sites(pipe.unet)
    assert sum(s.kind == "self" for s in sites) == 70 and sum(s.kind == "cross" for s in sites) == 70


def test_make_tiny_model_dit_writes_a_transformer_pipeline_sites_and_inpaint_read(tmp_path, capsys):
    from diffusers import FluxFillPipeline

    target = tmp_path / "tiny-flux"
    assert main(["make-tiny-model", str(target), "--dit", "flux-fill"]) == 0
    assert "FluxFillPipeline.from_pretrained" in capsys.readouterr().out
    assert type(FluxFillPipeline.from_pretrained(str(target)).transformer).__name__ == "FluxTransformer2DModel"
    assert main(["sites", str(target), "--height", "64", "--width", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"# {target}: sites at 64x64 (latent 32x32, flux transformer)"
    assert [line.split()[0] for line in lines[1:]] == ["joint[0]", "joint[1]", "single[0]", "single[1]"]
    assert main(["make-tiny-model", str(tmp_path / "x"), "--dit", "sd3", "--sdxl"]) == 2
    assert "two different models" in capsys.readouterr().err
