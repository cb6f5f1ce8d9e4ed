#!/usr/bin/env python
"""How large the Attention Steer Loss's latent update is, inside and outside the mask, per step.

For each step where the steer loss acts, the RMS of the update ``u`` (``z <- z - u``) over
the latent positions inside the inpainting mask and outside it, each in units of the
latent's standard deviation, and the loss before and after the update (one extra pass per
step, ``record_loss_after``), read from the strategy's per-step log:

- on the testbed model (``model.pretrained=testbed``), over held-out scenes (split
  ``eval``, box masks, seed 0 per scene), for each step reading given with ``--rules``;
- on the full-size SD 1.5 inpainting architecture with random weights at 512x512
  (``--sd15-steps`` steps of a 50-step run; gradient magnitudes only: random weights make
  the attention maps, and so the direction of the gradient, meaningless).

    OMP_NUM_THREADS=2 python scripts/steer-update-stats.py --out out/steer-stats [--items 20] [--sd15-steps 3]

Writes ``stats.json``, ``stats.md`` and ``update_rms.png`` into ``--out``; results of this
machine are in docs/testbed.md (Why L_s scrambles the background).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import attnctl
import harmonpaint_recipe as hp
from harmonpaint_recipe.loading import resolved
from harmonpaint_recipe.runner import attach_config, prompt_token_indices
from harmonpaint_recipe.testbed.world import render, render_scene, sample_scene

#: step readings measured on the testbed: name -> overrides of the harmonpaint recipe
RULES = {
    "paper": [],
    "normalized": ["strategies.steer.step_rule=normalized", "strategies.steer.step_size=0.1"],
    "mask": ["strategies.steer.step_region=mask"],
    "masked-step": ["strategies.steer.step_rule=normalized", "strategies.steer.step_size=0.01",
                    "strategies.steer.step_region=mask"],
}
KEYS = ("update_rms_mask", "update_rms_outside", "loss", "loss_after", "latent_std")


def steer_log(pipe, recipe, image: Image.Image, mask: Image.Image, prompt: str, seed: int,
              steps_done: int | None = None) -> list[dict]:
    """Run the recipe through the core API and return the steer instance's per-step log."""
    config = resolved(recipe)
    sampler = config["sampler"]
    kwargs = dict(prompt=prompt, image=image, mask_image=mask, height=image.height, width=image.width,
                  num_inference_steps=int(sampler["steps"]), guidance_scale=float(sampler["guidance_scale"]),
                  generator=torch.Generator().manual_seed(seed), output_type="latent")
    if steps_done is not None:
        def stop(p, step, t, callback_kwargs):
            if step + 1 >= steps_done:
                p._interrupt = True  # diffusers skips the remaining steps
            return callback_kwargs
        kwargs["callback_on_step_end"] = stop
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with attnctl.attach(pipe, attach_config(config)) as ctl:
        layout = attnctl.BatchLayout.for_call(pipe, prompt=prompt, guidance_scale=kwargs["guidance_scale"])
        tokens = [prompt_token_indices(pipe.tokenizer, prompt)]
        with ctl.run(layout, mask=mask, token_indices=tokens) as state:
            pipe(**kwargs)
    return [dict(e) for e in state.scratch.get("steer", {}).get("history", [])]


def per_step(logs: list[list[dict]]) -> dict[str, list[float]]:
    """Mean over runs of each logged key, per step."""
    steps = sorted({e["step"] for log in logs for e in log})
    out: dict[str, list[float]] = {"step": steps}
    for key in KEYS:
        out[key] = [float(np.mean([e[key] for log in logs for e in log if e["step"] == s and key in e])) for s in steps]
    return out


def testbed(items: int, rules: list[str]) -> dict[str, dict]:
    results = {}
    pipe = None
    for rule in rules:
        recipe = hp.load_recipe("harmonpaint", ["model.pretrained=testbed", "strategies.steer.record_loss_after=true",
                                               *RULES[rule]])
        pipe = pipe or hp.load_pipeline(recipe)
        logs = []
        for i in range(items):
            scene = sample_scene(i, "eval", mask_kind="box")
            rendered = render_scene(scene)
            logs.append(steer_log(pipe, recipe, Image.fromarray(render(scene, "background")),
                                  Image.fromarray(rendered.mask, "L"), scene.caption(False), seed=0))
        results[rule] = per_step(logs)
        print(f"testbed {rule}: {items} scenes done", flush=True)
    return results


def sd15(steps: int) -> dict[str, list[float]]:
    from harmonpaint_recipe.bench.archs import ARCHITECTURES, build_pipeline
    from harmonpaint_recipe.bench.harness import make_inputs

    arch = ARCHITECTURES.get("sd15-inpaint")
    pipe = build_pipeline(arch, seed=0, device=torch.device("cpu"), dtype=torch.float32)
    image, mask, _ = make_inputs(arch.default_size, seed=0)
    recipe = hp.load_recipe("harmonpaint", ["strategies.steer.record_loss_after=true"])
    log = steer_log(pipe, recipe, image, mask, "a small owl", seed=0, steps_done=steps)
    return per_step([log])


def table(name: str, stats: dict[str, list[float]]) -> list[str]:
    lines = [f"### {name}", "", "| step | update RMS in mask / std(z) | outside mask / std(z) | loss before | loss after |",
             "|---|---|---|---|---|"]
    for i, s in enumerate(stats["step"]):
        lines.append(f"| {s} | {stats['update_rms_mask'][i]:.4f} | {stats['update_rms_outside'][i]:.4f} | "
                     f"{stats['loss'][i]:.4f} | {stats['loss_after'][i]:.4f} |")
    return lines + [""]


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for c, (name, stats) in enumerate(results.items()):
        axes[0].plot(stats["step"], stats["update_rms_mask"], "-", color=f"C{c}", marker=".", label=f"{name}: in the mask")
        axes[0].plot(stats["step"], stats["update_rms_outside"], "--", color=f"C{c}", marker=".", label=f"{name}: outside")
        axes[1].plot(stats["step"], np.array(stats["loss"]) - np.array(stats["loss_after"]), "-", color=f"C{c}",
                     marker=".", label=name)
    axes[0].set_title("latent update RMS / latent std", fontsize=9)
    axes[1].set_title("steer loss decrease per update (before - after)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("denoising step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--items", type=int, default=20, help="testbed scenes [20]")
    parser.add_argument("--rules", default=",".join(RULES), help=f"testbed step readings [{','.join(RULES)}]")
    parser.add_argument("--sd15-steps", type=int, default=3, help="steps of the SD 1.5 run, 0 to skip [3]")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {f"testbed, {rule}": stats for rule, stats in testbed(args.items, args.rules.split(",")).items()}
    if args.sd15_steps > 0:
        results["SD 1.5 512x512, random weights, paper"] = sd15(args.sd15_steps)
    (out / "stats.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    lines = [f"Steer update statistics ({args.items} testbed scenes; {time.perf_counter() - started:.0f} s)", ""]
    for name, stats in results.items():
        lines += table(name, stats)
    (out / "stats.md").write_text("\n".join(lines), encoding="utf-8")
    plot(results, out / "update_rms.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
