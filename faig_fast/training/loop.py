"""The resumable training loop: one Adam step on an L1 loss with an EMA update per iteration, a JSON
line of log every ``log_every`` iterations and ``state.pt`` every ``ckpt_every``."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from faig_fast.errors import InvalidInputError
from faig_fast.models import save_model
from faig_fast.training.config import TrainConfig, lr_at
from faig_fast.training.data import DataSource, load_training_images, sample_batch
from faig_fast.training.state import Run, new_run, resume, save_state, trim_log

__all__ = ["train", "Callback"]

PathLike = Union[str, "os.PathLike[str]"]
#: ``callback(iteration, loss) -> True`` stops the run after saving ``state.pt``.
Callback = Callable[[int, float], "bool | None"]


def _metadata(cfg: TrainConfig, init: PathLike | None, mask: dict[str, Tensor] | None) -> dict[str, Any]:
    """What the saved model's header records about its training."""
    return {"iters": cfg.iters, "preset": cfg.preset, "seed": cfg.seed, "lr": cfg.lr,
            "lr_schedule": cfg.lr_schedule, "blur_prob": cfg.blur_prob, "noise_prob": cfg.noise_prob,
            "blur_sigma": cfg.blur_sigma, "noise_sigma": cfg.noise_sigma,
            "kernel_size": cfg.kernel_size, "batch_size": cfg.batch_size,
            "patch_size": cfg.patch_size, "ema_decay": cfg.ema_decay,
            "init": str(init) if init is not None else None,
            "masked_params": sorted(mask) if mask is not None else None, "weights": "ema"}


@torch.no_grad()
def _after_step(run: Run, cfg: TrainConfig, it: int) -> None:
    """Restore the frozen entries of a masked run and update the EMA after (0-based) step ``it``."""
    params = run.params
    if run.mask is not None:  # Adam on zero grads is an exact no-op; restore anyway, to be sure.
        for n, m in run.mask.items():
            params[n].copy_(torch.where(m, params[n], run.frozen[n]))
    t = it + 1  # updates done, this one included
    decay = min(cfg.ema_decay, (1 + t) / (10 + t))
    for pe, pm in zip(run.ema.parameters(), run.model.parameters()):
        pe.lerp_(pm, 1.0 - decay)  # lerp: an unchanged weight stays bit-identical in the EMA
    for be, bm in zip(run.ema.buffers(), run.model.buffers()):
        be.copy_(bm)


def _step(run: Run, cfg: TrainConfig, images: Sequence[Tensor], it: int, device: torch.device
          ) -> tuple[float, float]:
    """One optimiser step at (0-based) iteration ``it`` and the EMA update; returns (loss, lr)."""
    lr = lr_at(cfg, it)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    lq, gt = sample_batch(images, cfg, run.gen)
    loss = F.l1_loss(run.model(lq.to(device)), gt.to(device))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.mask is not None:
        for n, m in run.mask.items():
            if run.params[n].grad is not None:
                run.params[n].grad.mul_(m)
    run.optimizer.step()
    _after_step(run, cfg, it)
    loss_v = loss.item()
    if not math.isfinite(loss_v):
        raise FloatingPointError(f"training loss became {loss_v} at iteration {it + 1}")
    return loss_v, lr


def _loop(run: Run, cfg: TrainConfig, images: Sequence[Tensor], paths: tuple[Path, Path], stop_at: int,
          device: torch.device, progress: bool, callback: Callback | None) -> tuple[int, float]:
    """Iterate from ``run.start`` to ``stop_at`` (or until ``callback`` says stop), logging and saving
    ``state.pt``; returns (iterations done, elapsed seconds in all)."""
    from tqdm import tqdm

    state_path, log_path = paths
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.iters, initial=run.start, disable=not progress, desc=f"train {state_path.parent.name}",
               dynamic_ncols=True)
    it, elapsed = run.start, run.elapsed0
    with open(log_path, "a") as log:
        while it < stop_at:
            loss_v, lr = _step(run, cfg, images, it, device)
            it += 1
            elapsed = run.elapsed0 + time.perf_counter() - t0
            if it % cfg.log_every == 0 or it == cfg.iters:
                log.write(json.dumps({"iter": it, "loss": loss_v, "lr": lr, "elapsed": round(elapsed, 3)}) + "\n")
                log.flush()
            bar.update(1)
            if it % 10 == 0:
                bar.set_postfix(loss=f"{loss_v:.4f}")
            stop = callback is not None and bool(callback(it, loss_v))
            if it % cfg.ckpt_every == 0 or it == cfg.iters or stop or it == stop_at:
                save_state(run, cfg, it, elapsed, state_path)
            if stop:
                break
    bar.close()
    return it, elapsed


def _check_max_iters(n: int | None) -> None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise InvalidInputError(f"max_iters_this_call must be None or an int >= 1, got {n!r}")


def train(cfg: TrainConfig, data: DataSource, out_dir: PathLike, init: PathLike | None = None,
          param_mask: dict[str, Tensor] | None = None, progress: bool = True, *,
          max_iters_this_call: int | None = None, callback: Callback | None = None) -> Path:
    """Train a model per ``cfg`` on ``data`` (a folder or image paths) into ``out_dir``.

    ``init``: checkpoint to start from (fine-tuning). ``param_mask``: weight-shaped 0/1 tensors keyed
    by parameter name; only the 1-entries train, parameters absent from it are frozen (unmasked
    weights stay bit-identical). Resumes from ``out_dir/state.pt`` when present (the config must
    match). ``max_iters_this_call`` / ``callback(iteration, loss) -> True`` stop early after saving
    ``state.pt`` (returned then); otherwise returns ``out_dir/model.safetensors`` (the EMA weights).
    ``out_dir/log.jsonl`` holds one ``{iter, loss, lr, elapsed}`` line every ``log_every`` iterations.
    The caller's global RNG state is left as it was (all randomness comes from seeded generators).
    """
    cfg.validate()
    _check_max_iters(max_iters_this_call)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, model_path, log_path = out_dir / "state.pt", out_dir / "model.safetensors", out_dir / "log.jsonl"
    device = torch.device(cfg.device)
    run = new_run(cfg, init, param_mask, device)
    resume(run, cfg, state_path, device)
    trim_log(log_path, run.start)
    run.freeze()
    meta = _metadata(cfg, init, run.mask)
    if run.start >= cfg.iters:  # finished earlier: (re)write the model only if it is missing
        if not model_path.exists():
            save_model(run.ema, model_path, {**meta, "wall_time_s": round(run.elapsed0, 1)})
        return model_path
    images = load_training_images(data, min_side=cfg.patch_size)
    stop_at = cfg.iters if max_iters_this_call is None else min(cfg.iters, run.start + max_iters_this_call)
    it, elapsed = _loop(run, cfg, images, (state_path, log_path), stop_at, device, progress, callback)
    if it < cfg.iters:
        return state_path
    save_model(run.ema, model_path, {**meta, "wall_time_s": round(elapsed, 1)})
    return model_path
