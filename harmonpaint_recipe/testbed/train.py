"""Training of the testbed: judges, VAE, then the inpainting UNet and text encoder.

``train_testbed(TrainSettings(out_dir=...))`` runs four stages into ``out_dir`` and skips a
stage whose output is already there (so an interrupted run resumes at the stage it was in):

1. ``judges/``: the fidelity classifier (trained on ground-truth renderings) and the
   harmony judge's calibration (see :mod:`.judges`);
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
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from attnctl.errors import ConfigError
from harmonpaint_recipe.testbed import data
from harmonpaint_recipe.testbed.judges import (
    SHAPE_CLASSES,
    FidelityJudge,
    FidelityNet,
    HarmonyJudge,
    crop_region,
    mask_box,
)
from harmonpaint_recipe.testbed.models import (
    LATENT_SIZE,
    assemble_pipeline,
    build_components,
    load_tokenizer,
    save_pipeline,
)
from harmonpaint_recipe.testbed.world import COLOUR_NAMES, MASK_KINDS, SHAPES, render, render_scene, sample_scene, scene_mask

CFG_DROP = 0.1
VAE_CROP = 32
OBJECT_WEIGHT = 4.0


@dataclass
class TrainSettings:
    """What ``attnctl testbed train`` trains, for how long, and where it writes."""

    out_dir: Path
    judge_steps: int = 3000
    judge_minutes: float = 10.0
    judge_scenes: int = 8000
    vae_steps: int = 6000
    vae_minutes: float = 25.0
    unet_steps: int = 8000
    unet_minutes: float = 80.0
    cache_scenes: int = 12000
    judge_batch: int = 64
    vae_batch: int = 32
    unet_batch: int = 32
    judge_lr: float = 2e-3
    vae_lr: float = 2e-3
    unet_lr: float = 5e-4
    ema_decay: float = 0.998
    calibration_scenes: int = 400
    seed: int = 0
    device: str = "cpu"
    half_unet: bool = True
    log_every: int = 50
    checkpoint_minutes: float = 10.0

    def check(self) -> None:
        for name in ("judge_steps", "vae_steps", "unet_steps", "cache_scenes", "judge_batch", "vae_batch", "unet_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("judge_minutes", "vae_minutes", "unet_minutes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")


@dataclass
class StageLog:
    """What a stage did: steps, wall time, and its losses at checkpoints."""

    steps: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Progress:
    """Step/time budget with a cosine learning-rate schedule and periodic progress lines."""

    def __init__(self, name: str, max_steps: int, minutes: float, base_lr: float, log_every: int, warmup: int = 50):
        self.name, self.max_steps, self.budget = name, max_steps, minutes * 60.0
        self.base_lr, self.log_every, self.warmup = base_lr, log_every, warmup
        self.start = time.perf_counter()
        self.step = 0
        self.smoothed: float | None = None
        self.log = StageLog()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def fraction(self) -> float:
        return min(1.0, max(self.step / self.max_steps, self.elapsed / self.budget))

    def done(self) -> bool:
        return self.step >= self.max_steps or self.elapsed >= self.budget

    def lr(self) -> float:
        warm = min(1.0, (self.step + 1) / self.warmup)
        return self.base_lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * self.fraction)))

    def update(self, loss: float, **extra: float) -> None:
        self.step += 1
        self.smoothed = loss if self.smoothed is None else 0.98 * self.smoothed + 0.02 * loss
        if self.step % self.log_every == 0 or self.done():
            self.log.losses.append((self.step, round(self.smoothed, 5)))
            more = "".join(f" | {k} {v:.4g}" for k, v in extra.items())
            print(f"[{self.name}] step {self.step} | {self.elapsed / 60:.1f} min | loss {self.smoothed:.4f} | "
                  f"{self.step / max(self.elapsed, 1e-9):.2f} step/s | lr {self.lr():.2e}{more}", flush=True)

    def finish(self) -> StageLog:
        self.log.steps, self.log.seconds = self.step, round(self.elapsed, 1)
        return self.log


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --- judges -------------------------------------------------------------------------------------

@dataclass
class JudgePool:
    """Ground-truth images for the fidelity judge, rendered once: flat, styled or object-free."""

    images: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    boxes: list[tuple[int, int, int, int]]
    shapes: torch.Tensor  # [N] index into SHAPE_CLASSES
    colours: torch.Tensor  # [N] index into COLOUR_NAMES, -100 for no object


def judge_pool(count: int, seed: int) -> JudgePool:
    rng = np.random.default_rng(seed)
    images, boxes, shapes, colours = [], [], [], []
    for i in range(count):
        scene = sample_scene(i, "judge")
        u = rng.random()
        mode = "background" if u < 0.15 else ("styled" if u < 0.575 else "flat")
        images.append(render(scene, mode))
        boxes.append(mask_box(scene_mask(scene) > 0))
        shapes.append(SHAPE_CLASSES.index("none") if mode == "background" else SHAPES.index(scene.shape))
        colours.append(-100 if mode == "background" else COLOUR_NAMES.index(scene.colour))
    return JudgePool(data.to_tensor(np.stack(images)), boxes, torch.tensor(shapes), torch.tensor(colours))


def _jitter(box: tuple[int, int, int, int], rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = box
    j = rng.integers(-3, 4, size=4)
    y0, x0 = int(np.clip(y0 + j[0], 0, size - 8)), int(np.clip(x0 + j[2], 0, size - 8))
    return y0, int(np.clip(y1 + j[1], y0 + 8, size)), x0, int(np.clip(x1 + j[3], x0 + 8, size))


def _augment(x: torch.Tensor, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """Blur or down-up sampling (a quarter each), colour bleed, noise and colour jitter, so
    the judge tolerates the softness of decoded images."""
    n = x.shape[0]
    u = torch.from_numpy(rng.random(n)).float()[:, None, None, None]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    soft = F.interpolate(F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True), scale_factor=2, mode="bilinear")
    x = torch.where(u < 0.25, blur, torch.where(u < 0.5, soft, x))
    # colour bleed: mix in a strongly blurred copy, as a decoder smears object and background
    smear = F.avg_pool2d(F.pad(F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, 1), (2, 2, 2, 2), mode="replicate"), 5, 1)
    bleed = torch.from_numpy(rng.uniform(0, 0.4, size=(n, 1, 1, 1))).float()
    x = x * (1 - bleed) + smear * bleed
    gain = torch.from_numpy(1 + rng.uniform(-0.1, 0.1, size=(n, 1, 1, 1))).float()
    bias = torch.from_numpy(rng.uniform(-0.06, 0.06, size=(n, 3, 1, 1))).float()
    sigma = torch.from_numpy(rng.uniform(0, 0.06, size=(n, 1, 1, 1))).float()
    return (x * gain + bias + torch.randn(x.shape, generator=gen) * sigma).clamp(-1, 1)


def fidelity_accuracy(judge: FidelityJudge, count: int = 600, split: str = "eval",
                      transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[str, float]:
    """Accuracy (shape and colour both right) on ``count`` ground-truth scenes, per rendering."""
    hits: dict[str, list[bool]] = {"flat": [], "styled": []}
    for start in range(0, count, 50):
        scenes = [sample_scene(i, split) for i in range(start, min(start + 50, count))]
        rendered = [render_scene(s) for s in scenes]
        masks = np.stack([r.mask > 0 for r in rendered])
        for mode in hits:
            images = np.stack([getattr(r, mode) for r in rendered])
            if transform is not None:
                images = transform(images)
            for s, (shape, colour) in zip(scenes, judge.predict(images, masks)):
                hits[mode].append(shape == s.shape and colour == s.colour)
    return {mode: float(np.mean(v)) for mode, v in hits.items()}


def train_fidelity(settings: TrainSettings) -> tuple[FidelityJudge, StageLog]:
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    pool = judge_pool(settings.judge_scenes, settings.seed)
    size = pool.images.shape[-1]
    net = FidelityNet()
    opt = torch.optim.AdamW(net.parameters(), lr=settings.judge_lr, weight_decay=1e-4)
    prog = Progress("fidelity", settings.judge_steps, settings.judge_minutes, settings.judge_lr, settings.log_every)
    while not prog.done():
        idx = rng.integers(0, len(pool.boxes), size=settings.judge_batch)
        boxes = [_jitter(pool.boxes[i], rng, size) for i in idx]
        crops = _augment(crop_region(pool.images[idx], boxes), rng, gen)
        shape_logits, colour_logits = net(crops)
        loss = F.cross_entropy(shape_logits, pool.shapes[idx]) + F.cross_entropy(
            colour_logits, pool.colours[idx], ignore_index=-100)
        _set_lr(opt, prog.lr())
        opt.zero_grad()
        loss.backward()
        opt.step()
        prog.update(loss.item())
    return FidelityJudge(net), prog.finish()


def calibrate_harmony(settings: TrainSettings) -> tuple[HarmonyJudge, dict[str, Any]]:
    """Normalize the harmony judge on styled and flat ground-truth scenes, per mask kind."""
    judge = HarmonyJudge()
    report: dict[str, Any] = {"scenes_per_kind": settings.calibration_scenes}
    for kind in MASK_KINDS:
        raw: dict[str, list[float]] = {"styled": [], "flat": []}
        for i in range(settings.calibration_scenes):
            r = render_scene(sample_scene(i, "calibrate", mask_kind=kind))
            for mode in raw:
                raw[mode].append(judge.distance(getattr(r, mode), r.mask > 0))
        judge.calibrate(kind, np.array(raw["styled"]), np.array(raw["flat"]))
        s, f = judge.calibration[kind]
        styled = (np.array(raw["styled"]) - s) / (f - s)
        flat = (np.array(raw["flat"]) - s) / (f - s)
        auc = float((styled[:, None] < flat[None, :]).mean() + 0.5 * (styled[:, None] == flat[None, :]).mean())
        report[kind] = {"raw_styled_mean": s, "raw_flat_mean": f, "styled_std": float(styled.std()),
                        "flat_std": float(flat.std()), "auc_flat_vs_styled": auc}
    return judge, report


def stage_judges(settings: TrainSettings) -> dict[str, Any]:
    folder = settings.out_dir / "judges"
    fid_path, harm_path = folder / "fidelity.safetensors", folder / "harmony.safetensors"
    report_path = folder / "report.json"
    if fid_path.is_file() and harm_path.is_file() and report_path.is_file():
        print(f"[judges] found in {folder}; skipping", flush=True)
        return json.loads(report_path.read_text(encoding="utf-8"))
    fidelity, log = train_fidelity(settings)
    accuracy = fidelity_accuracy(fidelity)
    print(f"[fidelity] held-out accuracy: flat {accuracy['flat']:.3f}, styled {accuracy['styled']:.3f}", flush=True)
    harmony, calib = calibrate_harmony(settings)
    for kind in MASK_KINDS:
        c = calib[kind]
        print(f"[harmony] {kind} masks: raw styled {c['raw_styled_mean']:.4f}, raw flat {c['raw_flat_mean']:.4f}, "
              f"normalized std styled {c['styled_std']:.3f} / flat {c['flat_std']:.3f}, AUC {c['auc_flat_vs_styled']:.3f}",
              flush=True)
    fidelity.save(fid_path)
    harmony.save(harm_path)
    report = {"fidelity": {**asdict(log), "accuracy_eval_gt": accuracy}, "harmony": calib}
    report_path.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


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
        _set_lr(opt, prog.lr())
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


def stage_unet(settings: TrainSettings, components: dict[str, Any], tokenizer) -> dict[str, Any]:
    from diffusers import DDPMScheduler

    from attnctl.tiny import SD_DDIM_SCHEDULER_CONFIG

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
        loss = F.mse_loss(pred, noise)
        _set_lr(opt, prog.lr())
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

def apply_umask(folder: Path) -> None:
    """Give every file under ``folder`` the permissions the umask asks for (safetensors
    writes its files owner-only)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~mask)


def loss_plot(report: dict[str, Any], path: Path) -> bool:
    """Loss curves of the three trained networks as a PNG; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curves = [("fidelity judge", report.get("judges", {}).get("fidelity", {})), ("VAE", report.get("vae", {})),
              ("UNet (epsilon MSE)", report.get("unet", {}))]
    fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
    for ax, (title, stage) in zip(axes, curves):
        points = stage.get("losses") or []
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_title(f"{title}: {stage.get('steps', 0)} steps, {stage.get('seconds', 0) / 60:.0f} min", fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


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
    report["judges"] = stage_judges(settings)
    components = build_components(settings.seed)
    vae_report = stage_vae(settings, components["vae"])
    components["vae"] = vae_report.pop("vae")
    report["vae"] = vae_report
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
