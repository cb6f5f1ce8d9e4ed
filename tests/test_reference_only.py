"""``reference_only`` against the algorithm of diffusers' reference-only port, written literally here.

The reference: before each main UNet call a separate "write" call runs the UNet on the reference
latent noised to the step's timestep (fresh noise from one seeded generator, duplicated for the
CFG branches, the main call's text and inpainting channels), and every self-attention module
banks its input; in the main ("read") call each module attends to ``[own ; bank]`` tokens, and
the unconditional rows take ``sf * plain + (1 - sf) * with_ref`` (explicit softmax processors,
float64). The plugin instead adds the reference rows to the main call's batch. Final latents
must agree to 1e-9.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from harmonpaint_recipe.inputs import prepare_inputs
from harmonpaint_recipe.loading import load_recipe
from harmonpaint_recipe.runner import Runner

STEPS = 4
PROMPT = "a cat"


def _explicit(attn, hidden, context):
    b = hidden.shape[0]
    q, k, v = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
    d = q.shape[-1] // attn.heads
    q, k, v = (t.reshape(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
    weights = (q @ k.transpose(-1, -2) * d**-0.5).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, -1, attn.heads * d)
    return attn.to_out[1](attn.to_out[0](out))


class PortProcessor:
    """One self-attention module in the port's write/read modes."""

    def __init__(self, port, name):
        self.port, self.name = port, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        port = self.port
        if port.mode == "write":
            port.bank[self.name] = hidden_states.detach().clone()
            return _explicit(attn, hidden_states, hidden_states)
        with_ref = _explicit(attn, hidden_states, torch.cat([hidden_states, port.bank[self.name]], dim=1))
        cond = with_ref.clone()
        uc = port.uc_mask
        if port.fidelity > 0:
            cond[uc] = _explicit(attn, hidden_states[uc], hidden_states[uc])
        return port.fidelity * cond + (1.0 - port.fidelity) * with_ref


class Port:
    """The port's loop around each main UNet call (a forward pre-hook that runs the write call first)."""

    def __init__(self, pipe, ref_latents, fidelity, seed):
        self.pipe, self.ref, self.fidelity = pipe, ref_latents, fidelity
        self.generator = torch.Generator().manual_seed(seed)
        self.mode, self.bank, self.busy = "read", {}, False
        self.uc_mask = torch.tensor([True, False])

    def hook(self, unet, args, kwargs):
        if self.busy:
            return None
        sample, t = args[0], args[1]
        noise = torch.randn(self.ref.shape, generator=self.generator).to(self.ref.dtype)
        ref_xt = self.pipe.scheduler.add_noise(self.ref, noise, t.reshape(1))
        ref_in = self.pipe.scheduler.scale_model_input(torch.cat([ref_xt] * 2), t)
        ref_in = torch.cat([ref_in, sample[:, 4:]], dim=1)
        self.busy, self.mode = True, "write"
        try:
            unet(ref_in, t, encoder_hidden_states=kwargs["encoder_hidden_states"], return_dict=False)
        finally:
            self.busy, self.mode = False, "read"
        return None


@pytest.fixture
def pipe64(tiny_pipe):
    from diffusers import DDIMScheduler

    tiny_pipe.scheduler = DDIMScheduler.from_config(tiny_pipe.scheduler.config)
    return tiny_pipe.to(torch.float64)


@pytest.fixture
def reference(tmp_path):
    rng = np.random.RandomState(5)
    path = tmp_path / "reference.png"
    Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8")).save(path)
    return path


def _latents():
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _port(pipe, image_and_mask, reference, fidelity):
    image, mask = image_and_mask
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(Image.open(reference).convert("RGB"), height=64, width=64)
        ref = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.mode() * pipe.vae.config.scaling_factor
    unet = copy.deepcopy(pipe.unet)
    port = Port(pipe, ref, fidelity, seed=0)
    unet.set_attn_processor({name: PortProcessor(port, name) if name.endswith("attn1.processor") else proc
                             for name, proc in unet.attn_processors.items()})
    handle = unet.register_forward_pre_hook(port.hook, with_kwargs=True)
    own, pipe.unet = pipe.unet, unet
    try:
        return pipe(prompt=PROMPT, image=image, mask_image=mask, num_inference_steps=STEPS, guidance_scale=7.5,
                    strength=1.0, latents=_latents(), output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images[0]  # as Runner seeds it (the masked image's latent)
    finally:
        pipe.unet = own
        handle.remove()


def _ours(pipe, image_and_mask, reference, fidelity, recipe="reference-only"):
    config = load_recipe(recipe, [f"sampler.steps={STEPS}", f"strategies.ref.image={reference}",
                                  f"strategies.ref.style_fidelity={fidelity}"] if recipe == "reference-only"
                         else [f"sampler.steps={STEPS}"])
    with Runner(pipe, config) as runner:
        return runner(prepare_inputs(*image_and_mask, warn=False), PROMPT, seed=0,
                      pipeline_kwargs={"output_type": "latent", "latents": _latents()}).image


@pytest.mark.parametrize("fidelity", [0.5, 0.0, 1.0])
def test_matches_the_ports_write_and_read_passes(pipe64, image_and_mask, reference, fidelity):
    theirs = _port(pipe64, image_and_mask, reference, fidelity)
    ours = _ours(pipe64, image_and_mask, reference, fidelity)
    plain = _ours(pipe64, image_and_mask, reference, fidelity, recipe="sdi")
    assert (ours - plain).abs().max() > 1e-3  # the control: the reference changes the image
    assert (ours - theirs).abs().max() < 1e-9


def test_a_missing_reference_is_named(tiny_pipe, image_and_mask, tmp_path):
    from attnctl.errors import InputError

    config = load_recipe("reference-only", ["sampler.steps=2", f"strategies.ref.image={tmp_path / 'nope.png'}"])
    with pytest.raises(InputError, match="strategies.ref.image: cannot read .*nope.png"):
        Runner(tiny_pipe, config)  # at attach time, before any step runs
