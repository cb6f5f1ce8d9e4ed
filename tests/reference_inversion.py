"""DDIM inversion written out as the authors compute it (MasaCtrl's ``invert``/``next_step``,
StyleAligned's ``_ddim_loop``/``_next_step``: the same step), for tests."""

from __future__ import annotations

import torch


def literal_inversion(pipe, z0, extra, prompt, guidance):
    """``[z0, z_1, ..., z_n]``: eps at t of the current latent, alpha of t - T/n (final alpha below 0),
    DDIM step up to t. ``extra``: the inpainting UNet's mask and masked-image channels ``[1, 5, h, w]``.
    The unconditional text is the pipeline's own for an empty negative prompt."""
    sched = pipe.scheduler
    texts = pipe.encode_prompt(prompt=prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    embeds = torch.cat([texts[1], texts[0]]) if guidance > 1 else texts[0]
    latents, out = z0, [z0]
    for t in reversed(sched.timesteps):
        inputs = torch.cat([latents] * len(embeds))
        with torch.no_grad():
            eps = pipe.unet(torch.cat([inputs, extra.expand(len(embeds), -1, -1, -1)], 1), t,
                            encoder_hidden_states=embeds).sample
        if guidance > 1:
            eps = eps[:1] + guidance * (eps[1:] - eps[:1])
        next_t, t_ = t, min(int(t) - sched.config.num_train_timesteps // sched.num_inference_steps, 999)
        alpha_t = sched.alphas_cumprod[t_] if t_ >= 0 else sched.final_alpha_cumprod
        alpha_next = sched.alphas_cumprod[next_t]
        pred_x0 = (latents - (1 - alpha_t) ** 0.5 * eps) / alpha_t ** 0.5
        latents = alpha_next ** 0.5 * pred_x0 + (1 - alpha_next) ** 0.5 * eps
        out.append(latents)
    return out
