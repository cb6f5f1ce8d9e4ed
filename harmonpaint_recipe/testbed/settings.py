"""Settings of ``attnctl testbed train``: step limits, time budgets, batch sizes, learning rates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from attnctl.errors import ConfigError


@dataclass
class TrainSettings:
    """What ``attnctl testbed train`` trains, for how long, and where it writes."""

    out_dir: Path
    judge_steps: int = 3000
    judge_minutes: float = 10.0
    judge_scenes: int = 8000
    harmony_steps: int = 5000
    harmony_minutes: float = 25.0
    vae_steps: int = 6000
    vae_minutes: float = 25.0
    unet_steps: int = 8000
    unet_minutes: float = 80.0
    cache_scenes: int = 12000
    judge_batch: int = 64
    harmony_batch: int = 32
    vae_batch: int = 32
    unet_batch: int = 32
    judge_lr: float = 2e-3
    vae_lr: float = 2e-3
    unet_lr: float = 5e-4
    ema_decay: float = 0.998
    #: Min-SNR-gamma loss weighting of the UNet stage (weight min(SNR, gamma) / SNR per sample);
    #: None = plain epsilon MSE. It shifts the loss towards noisy timesteps, where the model must
    #: take the background's colours from the masked-image latents.
    snr_gamma: float | None = None
    calibration_scenes: int = 400
    seed: int = 0
    device: str = "cpu"
    half_unet: bool = True
    log_every: int = 50
    checkpoint_minutes: float = 10.0
    #: continue from the UNet and text encoder of this pipeline folder (its VAE and judges are reused)
    init_from: Path | None = None

    def check(self) -> None:
        for name in ("judge_steps", "harmony_steps", "vae_steps", "unet_steps", "cache_scenes", "judge_batch", "harmony_batch", "vae_batch", "unet_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("judge_minutes", "harmony_minutes", "vae_minutes", "unet_minutes", "unet_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ConfigError(f"snr-gamma must be positive, got {self.snr_gamma}")
        if self.init_from is not None:
            for part in ("model_index.json", "unet", "text_encoder", "vae", "judges"):
                if not (Path(self.init_from) / part).exists():
                    raise ConfigError(f"--init-from '{self.init_from}' has no {part}; give a folder written by "
                                      "`attnctl testbed train`")
            if Path(self.init_from).resolve() == Path(self.out_dir).resolve():
                raise ConfigError("--init-from must be another folder than OUT_DIR (the continued model is written anew)")
