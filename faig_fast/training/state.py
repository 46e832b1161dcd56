"""The state of one training run: the model to train, its EMA, Adam, the batch generator and the
frozen weights of a masked run; resume from ``state.pt`` and the log kept in step with it."""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor, nn

from faig_fast.errors import CheckpointError, InvalidInputError
from faig_fast.models import create_model, list_presets, load_model
from faig_fast.training.config import COMPARED, TrainConfig
from faig_fast.utils.io import atomic_write, atomic_write_text

__all__ = ["Run", "build_model", "new_run", "resume", "trim_log", "save_state"]

PathLike = Union[str, "os.PathLike[str]"]


def build_model(cfg: TrainConfig, init: PathLike | None = None) -> nn.Module:
    """The model to train: from ``init`` (a checkpoint) when given, else freshly initialised from seed
    ``cfg.seed`` (the caller's global RNG is left untouched) with the registry preset ``cfg.preset``
    (if the architecture has one of that name) overridden by ``cfg.model_kwargs``."""
    if init is not None:
        model = load_model(init)
        arch = getattr(model, "arch_name", None)
        if arch != cfg.arch:
            raise InvalidInputError(
                f"init checkpoint {str(init)!r} holds a {arch!r} model, but the config trains {cfg.arch!r}")
        if getattr(model, "upscale", cfg.scale) != cfg.scale:
            raise InvalidInputError(
                f"init checkpoint {str(init)!r} is a x{model.upscale} model, but the config has "
                f"scale={cfg.scale}")
        return model.train()
    preset = cfg.preset if cfg.preset in list_presets(cfg.arch) else None
    kwargs = dict(cfg.model_kwargs)
    kwargs["upscale"] = cfg.scale
    return create_model(cfg.arch, preset=preset, seed=cfg.seed, **kwargs).train()


def check_param_mask(model: nn.Module, param_mask: dict[str, Tensor]) -> dict[str, Tensor]:
    """``param_mask`` as bool tensors on the parameters' devices; InvalidInputError on an unknown name,
    a wrong shape or a mask that selects nothing."""
    params = dict(model.named_parameters())
    out = {}
    for name, m in param_mask.items():
        if name not in params:
            raise InvalidInputError(f"param_mask key {name!r} is not a parameter of {type(model).__name__}")
        if not isinstance(m, Tensor) or tuple(m.shape) != tuple(params[name].shape):
            raise InvalidInputError(
                f"param_mask[{name!r}] must be a tensor of shape {tuple(params[name].shape)}, got "
                f"{tuple(getattr(m, 'shape', ()))}")
        out[name] = (m != 0).to(device=params[name].device)
    if not any(bool(m.any()) for m in out.values()):
        raise InvalidInputError("param_mask selects no weights: nothing would be trained")
    return out


@dataclass
class Run:
    """The mutable state of one training run: model, EMA, optimiser, sampler and the frozen weights."""

    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    gen: torch.Generator
    mask: dict[str, Tensor] | None
    params: dict[str, nn.Parameter]
    frozen: dict[str, Tensor]
    start: int = 0
    elapsed0: float = 0.0

    def state(self, cfg: TrainConfig, it: int, elapsed: float) -> dict[str, Any]:
        return {"config": cfg.to_dict(), "iteration": it, "elapsed": elapsed,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.gen.get_state(),
                "masked": sorted(self.mask) if self.mask is not None else None}

    def freeze(self) -> None:
        """Remember the masked parameters' current values (their unmasked entries must stay these)."""
        self.frozen = {n: self.params[n].detach().clone() for n in (self.mask or {})}


def new_run(cfg: TrainConfig, init: PathLike | None, param_mask: dict[str, Tensor] | None,
            device: torch.device) -> Run:
    """Model (trainable parameters per ``param_mask``), its EMA copy, Adam and the batch generator."""
    model = build_model(cfg, init).to(device)
    mask = check_param_mask(model, param_mask) if param_mask is not None else None
    params = dict(model.named_parameters())
    trainable = [n for n in params if mask is None or n in mask]
    for n, p in params.items():
        p.requires_grad_(n in trainable)
    optimizer = torch.optim.Adam([params[n] for n in trainable], lr=cfg.lr, betas=(0.9, 0.99))
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    return Run(model, ema, optimizer, gen, mask, params, frozen={})


def resume(run: Run, cfg: TrainConfig, state_path: Path, device: torch.device) -> None:
    """Continue from ``state.pt`` when it exists (refused when written by another config or mask)."""
    if not state_path.exists():
        return
    try:
        state = torch.load(state_path, map_location=device, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read training state {str(state_path)!r}: {e}") from e
    saved = state.get("config", {})
    diff = [k for k in COMPARED if saved.get(k) != cfg.to_dict()[k]]
    if diff:
        raise InvalidInputError(
            f"{str(state_path)!r} was written by a run with a different config ({', '.join(diff)} "
            "differ); use another out_dir or delete it")
    if state.get("masked") != (sorted(run.mask) if run.mask is not None else None):
        raise InvalidInputError(f"{str(state_path)!r} was written with a different param_mask")
    run.model.load_state_dict(state["model"])
    run.ema.load_state_dict(state["ema"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.gen.set_state(state["generator"].cpu())
    run.start, run.elapsed0 = int(state["iteration"]), float(state.get("elapsed", 0.0))


def save_state(run: Run, cfg: TrainConfig, it: int, elapsed: float, path: Path) -> None:
    """Write ``state.pt`` atomically (a killed run leaves the previous one intact)."""
    with atomic_write(path) as tmp:
        torch.save(run.state(cfg, it, elapsed), tmp)


def trim_log(log_path: Path, start: int) -> None:
    """Keep only the log lines the saved state has reached (a killed run may have logged further)."""
    if log_path.exists():
        kept = [ln for ln in log_path.read_text().splitlines()
                if ln.strip() and start > 0 and json.loads(ln)["iter"] <= start]
        atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))
