#!/usr/bin/env python
"""What the cross_maps probe costs in an SD1.5-shaped 512x512 run, measured where it acts.

Two interleaved measurements in process CPU time (less disturbed by other processes on a
shared machine than wall time), fp32, one thread unless OMP_NUM_THREADS says otherwise:

- sites (default): the attention core at the sites the probe reads by default, the 32x32
  and 16x16 grids (5 cross-attention sites each in SD1.5: 8 heads, 77 text keys, CFG batch
  2), as plain SDPA and as attnctl's core with the probe's MeasureOp (12 prompt tokens);
  prints the time per call and the extra time per UNet step;
- ``--unet``: whole UNet steps of a random-weight SD1.5 inpainting UNet at a 64x64 latent,
  stock and with the probe reading every step (slow: a step takes seconds to tens of seconds
  on a CPU core; builds the 860M-parameter UNet first).

    OMP_NUM_THREADS=1 python scripts/probe-overhead.py [--rounds 60] [--unet --unet-rounds 6]

Results of this machine are in docs/probes.md (Cost).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from attnctl import ActiveOps, BatchLayout, Site
from attnctl.attention import compute
from attnctl.call import AttentionCall
from attnctl.plan import Plan
from attnctl.run_state import RunState
from attnctl.sites import SiteTable
from strategies.probe_cross_maps import CrossMapsOp

TOKENS = list(range(1, 13))
#: (level, grid side, head width, sites) of SD1.5's cross-attention at 512x512 that cross/2 and cross/4 select
PROBED = ((1, 32, 80, 5), (2, 16, 160, 5))


def interleaved(functions: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """CPU seconds of each function per round, alternating which runs first."""
    names = list(functions)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.process_time()
            functions[name]()
            times[name].append(time.process_time() - start)
    return times


def site_overhead(rounds: int) -> float:
    """Extra CPU seconds per UNet step at the probed sites; prints per-call medians."""
    layout = BatchLayout.for_pipeline(1, 1, cfg=True)
    extra = 0.0
    for level, grid, head_width, sites in PROBED:
        site = Site("probe.attn2", "cross", "down", 0, level)
        state = RunState(Plan(sites=SiteTable([site])), layout, mask=torch.ones(1, 1, 512, 512),
                         token_indices=[TOKENS], timesteps=[500.0])
        state.begin_step(500.0, latent_hw=(64, 64))
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 8, grid * grid, head_width, generator=g)
        k, v = (torch.randn(2, 8, 77, head_width, generator=g) for _ in range(2))
        op = CrossMapsOp("cross_maps", site=site)
        functions = {
            "plain": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
            "probe": lambda: compute(AttentionCall(site, state, q, k, v, None, head_width**-0.5), ActiveOps(measure=(op,))),
        }
        interleaved(functions, 5)  # warm-up
        median = {n: statistics.median(t) for n, t in interleaved(functions, rounds).items()}
        print(f"{grid}x{grid} ({sites} sites): plain {1e3 * median['plain']:.2f} ms, "
              f"with the probe {1e3 * median['probe']:.2f} ms per call")
        extra += sites * (median["probe"] - median["plain"])
    print(f"extra CPU time per UNet step: {1e3 * extra:.1f} ms")
    return extra


def unet_steps(rounds: int) -> None:
    """Whole UNet steps, stock and probed, interleaved; prints the median and min-to-min ratios."""
    import attnctl
    from attnctl.testing import build_unet

    torch.manual_seed(0)
    unet = build_unet("sd15-inpaint", device="cpu").eval()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 64, 64, generator=g)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    mask = torch.zeros(1, 1, 512, 512)
    mask[..., 128:384, 128:384] = 1
    config = {"probes": {"cross_maps": {"enabled": True, "steps": "all"}}}

    def stock() -> None:
        with torch.no_grad():
            unet(sample, 500, encoder_hidden_states=emb)

    def probed() -> None:
        with attnctl.attach(unet, config) as ctl, ctl.run(BatchLayout.for_pipeline(1, 1, cfg=True), mask=mask,
                                                           token_indices=[TOKENS]):
            stock()

    interleaved({"stock": stock, "probe": probed}, 1)  # warm-up
    times = interleaved({"stock": stock, "probe": probed}, rounds)
    median = {n: statistics.median(t) for n, t in times.items()}
    print(f"UNet step: stock {median['stock']:.2f} s, with the probe {median['probe']:.2f} s (median CPU time); "
          f"ratio {median['probe'] / median['stock']:.3f}, min to min {min(times['probe']) / min(times['stock']):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="interleaved rounds per site grid [60]")
    parser.add_argument("--unet", action="store_true", help="also time whole SD1.5 UNet steps (slow)")
    parser.add_argument("--unet-rounds", type=int, default=6, help="interleaved rounds of UNet steps [6]")
    args = parser.parse_args()
    site_overhead(args.rounds)
    if args.unet:
        unet_steps(args.unet_rounds)


if __name__ == "__main__":
    main()
