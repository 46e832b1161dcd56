"""One training run's settings (:class:`TrainConfig`) and its learning-rate schedule."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from faig_fast.errors import InvalidInputError

__all__ = ["TrainConfig", "MIN_LR", "lr_at", "COMPARED"]

MIN_LR = 1e-7  # eta_min of the cosine schedule (BasicSR's CosineAnnealingRestartLR default in configs)


@dataclass
class TrainConfig:
    """One training run. ``preset`` names the registry preset of ``arch`` (widths), overridden by
    ``model_kwargs``; when ``train`` gets an ``init`` checkpoint the architecture comes from it."""

    arch: str = "msrresnet"
    preset: str = "tiny"
    scale: int = 2
    iters: int = 600
    batch_size: int = 16
    patch_size: int = 64
    lr: float = 2e-4
    ema_decay: float = 0.999
    blur_prob: float = 0.0
    noise_prob: float = 0.0
    blur_sigma: float = 2.0
    noise_sigma: float = 0.1
    kernel_size: int = 21
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 200
    device: str = "cpu"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    lr_schedule: str = "cosine"  # "cosine" (to MIN_LR) or "constant"

    def validate(self) -> None:
        """Raise InvalidInputError on an unusable field."""
        for name in ("scale", "iters", "batch_size", "patch_size", "log_every", "ckpt_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidInputError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        if self.patch_size % self.scale:
            raise InvalidInputError(
                f"TrainConfig.patch_size ({self.patch_size}) must be a multiple of scale ({self.scale})")
        for name in ("blur_prob", "noise_prob"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise InvalidInputError(f"TrainConfig.{name} must be in [0, 1], got {v!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InvalidInputError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0.0 <= self.ema_decay < 1.0):
            raise InvalidInputError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise InvalidInputError(
                f"TrainConfig.lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidInputError(f"TrainConfig.seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The fields a resumed run must share with the run that wrote ``state.pt`` (``device``, ``log_every`` and
#: ``ckpt_every`` may change between the two).
COMPARED = ("arch", "preset", "scale", "iters", "batch_size", "patch_size", "lr", "ema_decay",
            "blur_prob", "noise_prob", "blur_sigma", "noise_sigma", "kernel_size", "seed",
            "model_kwargs", "lr_schedule")


def lr_at(cfg: TrainConfig, it: int) -> float:
    """Learning rate for (0-based) iteration ``it``: constant, or cosine from ``cfg.lr`` to MIN_LR."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    eta_min = min(MIN_LR, cfg.lr)
    return eta_min + 0.5 * (cfg.lr - eta_min) * (1 + math.cos(math.pi * it / cfg.iters))
