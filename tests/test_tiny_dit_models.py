"""The tiny DiT inpainting pipelines (``attnctl.testing.dit``) and the full-size DiT configs.

Each tiny kind runs from prompt strings through its stock diffusers pipeline at 64x64 and 64x96,
its saved folder loads offline through ``from_pretrained`` and gives the built pipeline's output
bit for bit, and the full-size transformers build on the meta device with their published
numbers of attention modules.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from attnctl.errors import ConfigError
from attnctl.models import model_names, named_model
from attnctl.testing import (
    DIT_CONFIGS,
    build_tiny_dit_pipeline,
    build_transformer,
    load_transformer_config,
    save_tiny_dit_pipeline,
    t5_char_tokenizer,
)

KINDS = ("sd3", "flux-fill")
PIPELINE_CLASS = {"sd3": "StableDiffusion3InpaintPipeline", "flux-fill": "FluxFillPipeline"}


@pytest.fixture
def offline(monkeypatch, no_network):
    """No network: ``HF_HUB_OFFLINE=1`` and every connection refused; the attempts are counted."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return no_network


@pytest.fixture(scope="module", params=KINDS)
def built(request):
    """``(kind, pipeline)``: a tiny DiT pipeline built in memory, seed 0, progress bar off."""
    pipe = build_tiny_dit_pipeline(request.param, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe


def attention_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules that take attention processors (what attnctl attaches to)."""
    return [name for name, m in model.named_modules() if hasattr(m, "get_processor") and hasattr(m, "set_processor")]


def inputs(height: int, width: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[16:48, 20:44] = 255
    return image, Image.fromarray(mask)


def inpaint(pipe, height: int = 64, width: int = 64, **kwargs) -> np.ndarray:
    image, mask = inputs(height, width)
    return pipe(prompt="a red cup", image=image, mask_image=mask, height=height, width=width, num_inference_steps=2,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def own_storage(pipe) -> None:
    """Copy every loaded weight into storage of its own. safetensors hands out views at the file's
    offsets, not 64-byte aligned; CPU matmuls on them may take another kernel path and differ from
    the built pipeline's in the last bit although the values are the same."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone()


def test_each_kind_has_its_models_layout(built):
    kind, pipe = built
    assert type(pipe).__name__ == PIPELINE_CLASS[kind]
    assert pipe.vae_scale_factor == 2
    sites = attention_modules(pipe.transformer)
    if kind == "sd3":
        assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 16
        # joint attention in the 3 blocks, plus block 0's image-only self-attention
        assert sites == ["transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.1.attn",
                         "transformer_blocks.2.attn"]
        assert pipe.transformer.transformer_blocks[0].attn.norm_q is not None  # qk_norm
        assert [type(e).__name__ for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)] == [
            "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    else:
        # packed latents, packed masked-image latents, packed pixel mask: 16 each
        assert pipe.transformer.config.in_channels == 48 and pipe.transformer.out_channels == 16
        assert sites == ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
                         "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]
        assert pipe.transformer.config.guidance_embeds
        assert pipe.scheduler.config.use_dynamic_shifting
    assert all(not m.training for m in pipe.components.values() if isinstance(m, torch.nn.Module))


@pytest.mark.parametrize("height, width, max_sequence_length", [(64, 64, None), (64, 96, 16)])
def test_each_kind_runs_from_prompt_strings(built, height, width, max_sequence_length):
    kind, pipe = built
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kw: seen.append((kw["hidden_states"].shape, kw["encoder_hidden_states"].shape)),
        with_kwargs=True)
    extra = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    try:
        out = inpaint(pipe, height, width, **extra)
    finally:
        hook.remove()
    assert out.shape == (1, height, width, 3) and np.isfinite(out).all()
    assert len(seen) == 2
    grid = (height // 4, width // 4)  # VAE factor 2, then 2x2 patches (SD3) or 2x2 packing (FLUX)
    if kind == "sd3":
        t5_tokens = max_sequence_length or 256  # the pipeline's default
        # classifier-free guidance doubles the batch; text = 77 CLIP tokens + the T5 tokens
        assert seen[0] == ((2, 16, 2 * grid[0], 2 * grid[1]), (2, 77 + t5_tokens, 64))
    else:
        t5_tokens = max_sequence_length or 512  # FLUX Fill pads T5 to 512 by default
        assert seen[0] == ((1, grid[0] * grid[1], 48), (1, t5_tokens, 64))


def test_saved_folder_loads_offline_and_gives_the_built_output(built, tmp_path, offline):
    import diffusers

    kind, pipe = built
    folder = save_tiny_dit_pipeline(tmp_path / kind, kind, seed=0)
    assert (folder / "README.md").read_text().startswith("Tiny random-weight")
    assert list(folder.rglob("*.safetensors")) and not list(folder.rglob("*.bin"))
    loaded = getattr(diffusers, PIPELINE_CLASS[kind]).from_pretrained(str(folder))
    loaded.set_progress_bar_config(disable=True)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            want, got = component.state_dict(), getattr(loaded, name).state_dict()
            assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    expected = inpaint(pipe)
    np.testing.assert_allclose(inpaint(loaded), expected, atol=1e-5)
    own_storage(loaded)
    assert np.array_equal(inpaint(loaded), expected)
    assert offline == []


def test_the_t5_tokenizer_is_built_offline_and_survives_save_and_load(tmp_path, offline):
    from transformers import T5TokenizerFast

    tokenizer = t5_char_tokenizer()
    ids = tokenizer("a red cup é", padding="max_length", max_length=16).input_ids
    # characters with a word-start mark before each word, </s> (1), then <pad> (0); é is <unk> (2)
    assert ids[:10] == tokenizer.convert_tokens_to_ids(["▁", "a", "▁", "r", "e", "d", "▁", "c", "u", "p"])
    assert ids[10:] == [3, 2, 1, 0, 0, 0] and tokenizer.convert_ids_to_tokens(3) == "▁"
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    tokenizer.save_pretrained(str(tmp_path))
    again = T5TokenizerFast.from_pretrained(str(tmp_path))
    assert again("a red cup é", padding="max_length", max_length=16).input_ids == ids
    assert again.decode(again("a red cup").input_ids, skip_special_tokens=True) == "a red cup"
    assert offline == []


@pytest.mark.parametrize("arch, sites, cls, in_channels", [
    ("sd3-medium", 24, "SD3Transformer2DModel", 16),
    ("sd35-medium", 37, "SD3Transformer2DModel", 16),  # 24 joint + 13 dual-attention attn2
    ("sd35-large", 38, "SD3Transformer2DModel", 16),
    ("flux1-dev", 57, "FluxTransformer2DModel", 64),  # 19 double-stream + 38 single-stream
    ("flux1-fill-dev", 57, "FluxTransformer2DModel", 384),  # 64 latents + 64 masked image + 256 mask
])
def test_full_size_transformers_build_on_meta(arch, sites, cls, in_channels):
    transformer = build_transformer(arch, device="meta")
    assert type(transformer).__name__ == cls
    assert len(attention_modules(transformer)) == sites
    assert transformer.config.in_channels == in_channels
    assert all(p.device.type == "meta" for p in transformer.parameters())
    assert not any(key.startswith("_") for key in load_transformer_config(arch))


def test_unknown_dit_architecture_and_kind_are_refused_with_a_suggestion():
    assert set(DIT_CONFIGS) == {"sd3-medium", "sd35-medium", "sd35-large", "flux1-dev", "flux1-fill-dev"}
    with pytest.raises(ConfigError, match="did you mean 'sd35-medium'"):
        load_transformer_config("sd35-medum")
    with pytest.raises(ConfigError, match="did you mean 'flux-fill'"):
        build_tiny_dit_pipeline("flux_fill")


@pytest.mark.parametrize("name, cls", [("tiny-sd3", "StableDiffusion3InpaintPipeline"),
                                       ("tiny-flux-fill", "FluxFillPipeline")])
def test_the_tiny_dit_models_are_built_in_names(name, cls):
    assert name in model_names()
    make = named_model(name)
    assert make is not None and type(make()).__name__ == cls
