"""One UNet call of the tiny model inside an attnctl run, with every core attention call recorded."""

from __future__ import annotations

import torch

import attnctl
from attnctl import BatchLayout

#: the pixel mask of the one image (128 x 128: a 16 x 16 latent)
MASK_BOX = (32, 96, 40, 100)


def one_unet_step(pipe, config, record=None, t=500.0, tokens=((1, 2, 3),)):
    """Results of one UNet call (CFG, one image) inside a run of ``config``.

    With ``record`` (a dict), every attention call that reaches attnctl's core stores
    ``site key -> (query, own keys, scale, masks)`` there: the inputs of the *unmodified*
    map at that site.
    """
    import attnctl.adapters as adapters

    g = torch.Generator().manual_seed(0)
    sample, emb = torch.randn(2, 9, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    mask = torch.zeros(1, 1, 128, 128)
    top, bottom, left, right = MASK_BOX
    mask[:, :, top:bottom, left:right] = 1
    original = adapters.compute

    def recording(call, ops):
        if record is not None:
            record[call.site.key] = (call.query.clone(), call.key[..., : call.num_own_keys, :].clone(), call.scale,
                                     call.mask().clone())
        return original(call, ops)

    adapters.compute = recording
    try:
        with attnctl.attach(pipe, config) as ctl:
            with ctl.run(BatchLayout.for_pipeline(1, 1, cfg=True), mask=mask, token_indices=[list(p) for p in tokens]) as st:
                with torch.no_grad():
                    pipe.unet(sample, t, encoder_hidden_states=emb)
    finally:
        adapters.compute = original
    return st.results
