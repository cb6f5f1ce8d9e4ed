"""A training stage's budget (steps and minutes), cosine learning rate and progress lines."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
