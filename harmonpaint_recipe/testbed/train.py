"""Training of the testbed: judges, VAE, then the inpainting UNet and text encoder.

``train_testbed(TrainSettings(out_dir=...))`` runs four stages into ``out_dir`` and skips a
stage whose output is already there (so an interrupted run resumes at the stage it was in):

1. ``judges/``: the fidelity classifier (trained on ground-truth renderings) and the
   harmony judge's calibration (see :mod:`.train_judges`);
2. ``vae/``: an ``AutoencoderKL`` (scale factor 4) trained on 32x32 crops of world images
   (L1 + MSE + a small KL term); its ``scaling_factor`` is set so latents have unit std;
3. ``unet/`` + ``text_encoder/``: standard SD-inpainting training (9 input channels:
   noisy latent, mask, masked-image latent; epsilon prediction, SD's noise schedule) on
   latents of ``cache_scenes`` scenes encoded once with the frozen VAE. Each scene serves
   both of its captions: the object alone with the flat rendering, the object plus
   "in <style> style" with the styled one; 10% of captions are dropped for classifier-free
   guidance. The text encoder is trained jointly; the UNet weights saved are an EMA;
4. the pipeline folder (``model_index.json``, tokenizer, scheduler) and ``training.json``
   (settings, steps, times, losses, judge accuracies).

Each stage stops at its step limit or its time budget, whichever comes first; the
learning rate follows a cosine over that progress. Progress lines go to stdout.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from harmonpaint_recipe.testbed import data
from harmonpaint_recipe.testbed.models import (
    LATENT_SIZE,
    assemble_pipeline,
    build_components,
    load_tokenizer,
    save_pipeline,
)
from harmonpaint_recipe.testbed.progress import Progress, set_lr
from harmonpaint_recipe.testbed.settings import TrainSettings
from harmonpaint_recipe.testbed.train_judges import stage_judges

CFG_DROP = 0.1
VAE_CROP = 32
OBJECT_WEIGHT = 4.0


# --- VAE ----------------------------------------------------------------------------------------

def _vae_crops(start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """32x32 crops and their per-pixel loss weights. Half the crops are centred (with
    jitter) on the object, so the small objects are not drowned by background texture;
    object pixels weigh ``1 + OBJECT_WEIGHT``."""
    images, objects, centers = data.vae_examples(start, size)
    rng = np.random.default_rng(start)
    limit = images.shape[-1] - VAE_CROP
    crops, weights = [], []
    for k, (img, obj, (cx, cy)) in enumerate(zip(images, objects, centers)):
        if k % 2 == 0:
            oy = int(np.clip(cy - VAE_CROP / 2 + rng.integers(-6, 7), 0, limit))
            ox = int(np.clip(cx - VAE_CROP / 2 + rng.integers(-6, 7), 0, limit))
        else:
            oy, ox = (int(v) for v in rng.integers(0, limit + 1, size=2))
        crops.append(img[:, oy:oy + VAE_CROP, ox:ox + VAE_CROP])
        weights.append(1 + OBJECT_WEIGHT * obj[:, oy:oy + VAE_CROP, ox:ox + VAE_CROP])
    return torch.stack(crops), torch.stack(weights)


def stage_vae(settings: TrainSettings, vae) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    folder = settings.out_dir / "vae"
    if (folder / "config.json").is_file():
        print(f"[vae] found in {folder}; skipping", flush=True)
        return {"loaded": str(folder), "vae": AutoencoderKL.from_pretrained(str(folder), use_safetensors=True)}
    device = torch.device(settings.device)
    vae = vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    prog = Progress("vae", settings.vae_steps, settings.vae_minutes, settings.vae_lr, settings.log_every)
    starts = iter(range(0, 10**12, settings.vae_batch))
    for x, weight in data.prefetch(lambda s: _vae_crops(s, settings.vae_batch), starts):
        x, weight = x.to(device), weight.to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        weight = weight / weight.mean()
        l1, mse = ((recon - x).abs() * weight).mean(), ((recon - x).pow(2) * weight).mean()
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = l1 + mse + 1e-4 * kl
        set_lr(opt, prog.lr())
        opt.zero_grad()
        loss.backward()
        opt.step()
        prog.update(loss.item(), mse=mse.item())
        if prog.done():
            break
    log = prog.finish()
    vae.eval()
    with torch.no_grad():
        sample = data.vae_batch(0, 256).to(device)
        std = float(vae.encode(sample).latent_dist.mean.std())
        held_out = data.vae_batch(0, 128, "eval").to(device)
        recon = vae.decode(vae.encode(held_out).latent_dist.mean).sample
        val_mse = float((recon - held_out).pow(2).mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.to("cpu").save_pretrained(str(folder), safe_serialization=True)
    print(f"[vae] done: {log.steps} steps in {log.seconds / 60:.1f} min, held-out MSE {val_mse:.5f} "
          f"(images in [-1, 1]), latent std {std:.3f}", flush=True)
    return {**asdict(log), "heldout_mse": val_mse, "latent_std": std, "vae": vae}


# --- UNet ---------------------------------------------------------------------------------------

@dataclass
class LatentCache:
    """Encoded scenes: posterior mean and std of the flat, styled and masked images, masks, captions."""

    mean: torch.Tensor  # [N, 3, 4, h, w] fp16 (flat, styled, masked)
    std: torch.Tensor  # same shape
    mask: torch.Tensor  # [N, 1, h, w] latent-size mask, as the pipeline resizes it
    flat_captions: list[str]
    styled_captions: list[str]


@torch.no_grad()
def encode_scenes(vae, count: int, device: torch.device, batch: int = 64) -> LatentCache:
    means, stds, masks, flat_caps, styled_caps = [], [], [], [], []
    start_time = time.perf_counter()
    for n, b in enumerate(data.prefetch(lambda s: data.inpaint_batch(s, min(batch, count - s)), iter(range(0, count, batch)))):
        x = torch.cat([b.flat, b.styled, b.masked]).to(device)
        post = vae.encode(x).latent_dist
        k = b.flat.shape[0]
        means.append(post.mean.view(3, k, *post.mean.shape[1:]).transpose(0, 1).half().cpu())
        stds.append(post.std.view(3, k, *post.std.shape[1:]).transpose(0, 1).half().cpu())
        masks.append(F.interpolate(b.mask, size=(LATENT_SIZE, LATENT_SIZE)))  # nearest, as the pipeline
        flat_caps += b.flat_captions
        styled_caps += b.styled_captions
        if (n + 1) % 50 == 0:
            print(f"[cache] {len(flat_caps)}/{count} scenes encoded | {(time.perf_counter() - start_time) / 60:.1f} min", flush=True)
    return LatentCache(torch.cat(means), torch.cat(stds), torch.cat(masks), flat_caps, styled_caps)


class _Ema:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)

    def copy_to(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        state.update(self.shadow)
        model.load_state_dict(state)


def _save_checkpoint(folder: Path, unet, text_encoder, ema: _Ema, step: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in ema.shadow.items()}
    save_file(state, str(folder / "unet_ema.safetensors"), metadata={"step": str(step)})
    save_file({k: v.contiguous().cpu() for k, v in text_encoder.state_dict().items()},
              str(folder / "text_encoder.safetensors"), metadata={"step": str(step)})


def _unet_loss(pred: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, snr_gamma: float | None) -> torch.Tensor:
    """Epsilon MSE, per sample weighted by ``min(SNR, gamma) / SNR`` when ``snr_gamma`` is set."""
    if snr_gamma is None:
        return F.mse_loss(pred, noise)
    snr = alpha_bar / (1 - alpha_bar)
    weight = torch.clamp(snr, max=snr_gamma) / snr
    return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()


def stage_unet(settings: TrainSettings, components: dict[str, Any], tokenizer) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    from attnctl.testing import SD_DDIM_SCHEDULER_CONFIG

    unet_dir, te_dir = settings.out_dir / "unet", settings.out_dir / "text_encoder"
    if (unet_dir / "config.json").is_file() and (te_dir / "config.json").is_file():
        print(f"[unet] found in {unet_dir}; skipping", flush=True)
        return {"loaded": str(unet_dir)}
    device = torch.device(settings.device)
    vae = components["vae"].to(device).eval()
    scale = float(vae.config.scaling_factor)
    cache_start = time.perf_counter()
    cache = encode_scenes(vae, settings.cache_scenes, device)
    cache_seconds = time.perf_counter() - cache_start
    print(f"[cache] {settings.cache_scenes} scenes in {cache_seconds / 60:.1f} min", flush=True)

    unet, text_encoder = components["unet"].to(device).train(), components["text_encoder"].to(device).train()
    noise_schedule = DDPMScheduler(**{k: v for k, v in SD_DDIM_SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
    alphas = noise_schedule.alphas_cumprod.to(device)
    token_cache: dict[str, torch.Tensor] = {}

    def tokens(captions: list[str]) -> torch.Tensor:
        for c in captions:
            if c not in token_cache:
                token_cache[c] = tokenizer(c, padding="max_length", max_length=tokenizer.model_max_length,
                                           truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([token_cache[c] for c in captions]).to(device)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=settings.unet_lr, weight_decay=0.01)
    ema = _Ema(unet, settings.ema_decay)
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    prog = Progress("unet", settings.unet_steps, settings.unet_minutes, settings.unet_lr, settings.log_every, warmup=200)
    last_checkpoint = time.perf_counter()
    n = settings.cache_scenes
    while not prog.done():
        idx = torch.from_numpy(rng.integers(0, n, size=settings.unet_batch))
        styled = torch.from_numpy(rng.random(settings.unet_batch) < 0.5)
        which = styled.long()  # 0 = flat target, 1 = styled target
        mean, std = cache.mean[idx].float(), cache.std[idx].float()
        eps_lat = torch.randn(mean.shape, generator=gen)
        lat = (mean + std * eps_lat) * scale
        target = lat[torch.arange(len(idx)), which].to(device)
        masked = lat[:, 2].to(device)
        mask = cache.mask[idx].to(device)
        captions = [cache.styled_captions[i] if s else cache.flat_captions[i] for i, s in zip(idx.tolist(), styled.tolist())]
        captions = [c if rng.random() >= CFG_DROP else "" for c in captions]
        noise = torch.randn(target.shape, generator=gen).to(device)
        t = torch.from_numpy(rng.integers(0, noise_schedule.config.num_train_timesteps, size=len(idx))).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * target + (1 - a).sqrt() * noise
        encoder_hidden = text_encoder(tokens(captions))[0]
        pred = unet(torch.cat([noisy, mask, masked], dim=1), t, encoder_hidden).sample
        loss = _unet_loss(pred, noise, a.view(-1), settings.snr_gamma)
        set_lr(opt, prog.lr())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(unet, prog.step)
        prog.update(loss.item())
        if time.perf_counter() - last_checkpoint > settings.checkpoint_minutes * 60:
            _save_checkpoint(settings.out_dir / "checkpoint", unet, text_encoder, ema, prog.step)
            last_checkpoint = time.perf_counter()
    log = prog.finish()
    ema.copy_to(unet)
    unet.eval().to("cpu")
    text_encoder.eval().to("cpu")
    unet.save_pretrained(str(unet_dir), safe_serialization=True)
    text_encoder.save_pretrained(str(te_dir), safe_serialization=True)
    print(f"[unet] done: {log.steps} steps in {log.seconds / 60:.1f} min, final loss {prog.smoothed:.4f}", flush=True)
    return {**asdict(log), "cache_scenes": settings.cache_scenes, "cache_seconds": round(cache_seconds, 1)}


# --- all ----------------------------------------------------------------------------------------

def vae_roundtrip_accuracy(out: Path, vae, count: int = 300) -> dict[str, float]:
    """The fidelity judge's accuracy on held-out ground truth passed through the VAE: the
    best a pipeline decoding with this VAE can score (the judge never trains on these)."""
    from harmonpaint_recipe.testbed.judges import FidelityJudge
    from harmonpaint_recipe.testbed.train_judges import fidelity_accuracy

    judge = FidelityJudge.load(out / "judges" / "fidelity.safetensors")
    vae = vae.to("cpu").eval()

    @torch.no_grad()
    def round_trip(images: np.ndarray) -> np.ndarray:
        return data.to_uint8(vae.decode(vae.encode(data.to_tensor(images)).latent_dist.mean).sample)

    accuracy = fidelity_accuracy(judge, count=count, transform=round_trip)
    print(f"[fidelity] on ground truth through the VAE: flat {accuracy['flat']:.3f}, styled {accuracy['styled']:.3f}",
          flush=True)
    return accuracy


def apply_umask(folder: Path) -> None:
    """Give every file under ``folder`` the permissions the umask asks for (safetensors
    writes its files owner-only)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)


def _stage_segments(report: dict[str, Any], key: str) -> list[tuple[str, dict]]:
    """``(label, stage report)`` of one stage over the chain of runs behind ``report`` (an
    ``--init-from`` run keeps its predecessor's report), oldest first, stages that trained only."""
    chain = []
    while report:
        chain.append(report)
        report = (report.get("init_from") or {}).get("report") or {}
    segments = []
    for run in reversed(chain):
        stage = run.get("judges", {}).get("fidelity", {}) if key == "judges" else run.get(key, {})
        # a stage skipped by a continued run reports its predecessor's training again
        if stage.get("losses") and not any(stage["losses"] == seen["losses"] for _, seen in segments):
            gamma = run.get("settings", {}).get("snr_gamma")
            label = f"min-SNR-{gamma:g} weighted" if key == "unet" and gamma else "MSE" if key == "unet" else ""
            segments.append((label, stage))
    return segments


def loss_plot(report: dict[str, Any], path: Path) -> bool:
    """Loss curves of the three trained networks as a PNG (runs continued with
    ``--init-from`` drawn after their predecessor's curve); ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [("fidelity judge", "judges"), ("VAE", "vae"), ("UNet", "unet")]
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for ax, (title, key) in zip(axes, panels):
        offset, minutes = 0, 0.0
        segments = _stage_segments(report, key)
        for label, stage in segments:
            points = stage["losses"]
            ax.plot([offset + p[0] for p in points], [p[1] for p in points], label=label or None)
            offset += stage.get("steps", 0)
            minutes += stage.get("seconds", 0) / 60
        if len(segments) > 1:
            ax.legend(fontsize=7)
        ax.set_title(f"{title}: {offset} steps, {minutes:.0f} min", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _reuse_earlier(earlier: Path, out: Path) -> dict[str, Any]:
    """Copy an earlier run's VAE and judges into ``out`` (the continued UNet needs its VAE's
    latents); return that run's training report, kept as history."""
    import shutil

    for part in ("vae", "judges"):
        if not (out / part).exists():
            shutil.copytree(earlier / part, out / part)
    history = earlier / "training.json"
    return {"folder": str(earlier), "report": json.loads(history.read_text(encoding="utf-8")) if history.is_file() else None}


def train_testbed(settings: TrainSettings) -> dict[str, Any]:
    """Run every stage (skipping finished ones) and write the pipeline folder; returns the report."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    settings.check()
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings.out_dir = out
    started = time.perf_counter()
    report: dict[str, Any] = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()}}
    if settings.init_from is not None:
        report["init_from"] = _reuse_earlier(Path(settings.init_from), out)
    report["judges"] = stage_judges(settings)
    components = build_components(settings.seed)
    if settings.init_from is not None:
        components["unet"] = UNet2DConditionModel.from_pretrained(str(Path(settings.init_from) / "unet"), use_safetensors=True)
        components["text_encoder"] = CLIPTextModel.from_pretrained(str(Path(settings.init_from) / "text_encoder"),
                                                                   use_safetensors=True)
    vae_report = stage_vae(settings, components["vae"])
    components["vae"] = vae_report.pop("vae")
    report["vae"] = vae_report
    report["judges"]["fidelity"]["accuracy_vae_roundtrip"] = vae_roundtrip_accuracy(out, components["vae"])
    tokenizer = load_tokenizer(out)
    report["unet"] = stage_unet(settings, components, tokenizer)
    unet = UNet2DConditionModel.from_pretrained(str(out / "unet"), use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(str(out / "text_encoder"), use_safetensors=True)
    vae = AutoencoderKL.from_pretrained(str(out / "vae"), use_safetensors=True)
    pipe = assemble_pipeline(unet, vae, text_encoder, tokenizer)
    save_pipeline(pipe, out, half=settings.half_unet)
    report["total_minutes"] = round((time.perf_counter() - started) / 60, 1)
    previous = out / "training.json"
    if previous.is_file():  # a resumed run keeps the stages' numbers from before
        old = json.loads(previous.read_text(encoding="utf-8"))
        for key in ("vae", "unet"):
            if "loaded" in report[key] and key in old:
                report[key] = old[key]
    (out / "training.json").write_text(json.dumps(report, indent=1, default=str), encoding="utf-8")
    loss_plot(report, out / "losses.png")
    apply_umask(out)
    print(f"wrote the testbed pipeline to {out} ({report['total_minutes']} min)", file=sys.stderr, flush=True)
    return report
