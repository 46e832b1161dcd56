"""Training of the baseline / target model pairs FAIG compares (paper Sec. 5.1), on CPU or GPU.

* **baseline**: ×``scale`` SR trained on clean bilinear downsampling only;
* **target**: fine-tuned from the baseline (EMA) weights with blur (σ=2, 21×21) and noise (σ=0.1),
  each applied independently with probability 0.5 per sample (Eq. 1 order: blur → bilinear ↓ →
  noise → 8-bit quantisation, from ``faig_fast.data.degradations``).

Recipe (the authors' BasicSR configs): Adam(β=(0.9, 0.99)), L1 loss, random ``patch_size``² GT crops
with random horizontal/vertical flips and 90° rotations (transposes), batch 16, lr 2e-4 (baseline) and
5e-5 (fine-tuning), decayed by a cosine schedule to 1e-7 over the run (BasicSR's
CosineAnnealingRestartLR with one period). An EMA of the weights is kept and is what gets saved.

Two documented deviations that only matter for short (CPU) runs:

* the EMA decay is warmed up as ``min(ema_decay, (1 + t) / (10 + t))`` at update ``t`` (as TensorFlow's
  ``ExponentialMovingAverage(num_updates=t)``), otherwise a 0.999 EMA of a few hundred iterations is
  mostly the initial weights; at 100K iterations this is the plain 0.999 EMA;
* ``PRESETS["tiny"]`` / ``["small"]`` shrink the widths and the iteration counts so a pair trains in
  minutes on a CPU, and fine-tune at lr 2e-4 instead of 5e-5: with 1.5K fine-tuning iterations, 5e-5
  left the tiny MSRResNet target *worse* than its baseline on blurry Set14/Set5 inputs (-0.24/-0.26 dB),
  2e-4 made it better (+0.11/+0.22 dB). ``PRESETS["paper"]`` is the full recipe (100K + 100K
  iterations at 2e-4 / 5e-5, sized for a GPU).

Speed: on CPU, run with ``OMP_NUM_THREADS=1`` (or ``torch.set_num_threads(1)``) when the machine is
shared; two intra-op threads on two busy cores made the tiny model ~4× slower.

Runs are deterministic for a seed (all randomness: model init from ``create_model(..., seed=seed)``,
which seeds a forked CPU RNG as ``torch.manual_seed(seed)`` would and restores the caller's state,
crops/augmentations/degradations from one ``torch.Generator(seed)``) and resumable: ``state.pt`` holds
model, EMA, optimiser, iteration and generator state, written atomically every ``ckpt_every`` iterations,
and a restarted run continues from it, ending bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from faig_fast.utils.io import atomic_write, atomic_write_text
from faig_fast.data.images import list_images, read_image
from faig_fast.data.degradations import add_noise, blur, downsample, quantize
from faig_fast.errors import CheckpointError, InvalidInputError
from faig_fast.models import create_model, list_presets, load_model, save_model

__all__ = ["TrainConfig", "PRESETS", "train", "train_pair", "load_training_images", "sample_batch",
           "build_model", "MIN_LR"]

PathLike = Union[str, "os.PathLike[str]"]
DataSource = Union[PathLike, Sequence[PathLike]]

MIN_LR = 1e-7  # eta_min of the cosine schedule (BasicSR's CosineAnnealingRestartLR default in configs)

#: Named recipes for ``train_pair``. ``model_kwargs`` (per architecture) override the registry preset
#: of the same name (``tiny`` / ``paper`` exist in the registry; ``small`` is defined here only);
#: ``arch_overrides[arch]`` replaces top-level entries for one architecture.
PRESETS: dict[str, dict[str, Any]] = {
    # ~2-3 minutes for a pair on a 2-core CPU; a smoke-test pair, not a good SR model.
    "tiny": {
        "baseline_iters": 1500, "finetune_iters": 1500, "batch_size": 16, "patch_size": 64,
        "baseline_lr": 2e-4, "finetune_lr": 2e-4, "log_every": 25, "ckpt_every": 250,
        "model_kwargs": {"msrresnet": {}, "srcnn_style": {}},
        # The plain SRCNN-style net (no global skip) learns far slower from scratch: after 1500
        # iterations at 2e-4 it was at 22.7 dB on clean Set5 (bilinear upsampling: 30.5 dB); and
        # with 1500 fine-tuning iterations its target was 0.1 dB worse than the baseline on blur.
        "arch_overrides": {"srcnn_style": {"baseline_iters": 3000, "baseline_lr": 1e-3,
                                           "finetune_iters": 3000}},
    },
    # The largest honest CPU pair: ~28 minutes (3000 + 2000 iterations) for baseline + fine-tuning on
    # one busy core of a shared 2-core CPU (~0.4 s/iteration); ~0.15 s/iteration on an idle one.
    "small": {
        "baseline_iters": 3000, "finetune_iters": 2000, "batch_size": 16, "patch_size": 64,
        "baseline_lr": 2e-4, "finetune_lr": 2e-4, "log_every": 50, "ckpt_every": 500,
        "model_kwargs": {"msrresnet": {"num_feat": 32, "num_block": 4},
                         "srcnn_style": {"num_feat": 32, "num_mid": 64}},
        # The plain net again needs a higher baseline lr and longer fine-tuning (see "tiny").
        "arch_overrides": {"srcnn_style": {"baseline_iters": 4000, "baseline_lr": 1e-3,
                                           "finetune_iters": 3000}},
    },
    # The paper's recipe (16 blocks × 64 feats MSRResNet / full-width SRCNN-style, 100K iters each).
    "paper": {
        "baseline_iters": 100_000, "finetune_iters": 100_000, "batch_size": 16, "patch_size": 64,
        "baseline_lr": 2e-4, "finetune_lr": 5e-5, "log_every": 100, "ckpt_every": 5000,
        "model_kwargs": {"msrresnet": {}, "srcnn_style": {}},
    },
}


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


# ----------------------------------------------------------------------------------------- data
def _read_uint8(path: Path) -> Tensor:
    """An image file as a uint8 CHW RGB tensor (kept as uint8 to hold a training set in memory);
    decoding is :func:`faig_fast.data.images.read_image`'s (8-bit levels round-trip exactly)."""
    return read_image(path).mul_(255.0).round_().to(torch.uint8)


def load_training_images(data: DataSource, min_side: int = 1) -> list[Tensor]:
    """Read a folder (or a list of image paths) once into memory as uint8 CHW RGB tensors, in
    sorted/given order. Images with a side below ``min_side`` raise InvalidInputError."""
    if isinstance(data, (str, os.PathLike)):
        paths = list_images(data)
    else:
        paths = [Path(p) for p in data]
        if not paths:
            raise InvalidInputError("training data is an empty list of images")
    images = []
    for p in paths:
        img = _read_uint8(p)
        if min(img.shape[-2:]) < min_side:
            raise InvalidInputError(
                f"training image {p} ({img.shape[-2]}x{img.shape[-1]}) is smaller than the GT patch "
                f"size {min_side}")
        images.append(img)
    return images


def _randint(high: int, gen: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=gen))


def sample_batch(images: Sequence[Tensor], cfg: TrainConfig, gen: torch.Generator
                 ) -> tuple[Tensor, Tensor]:
    """One training batch ``(lq, gt)`` (float32 BCHW in [0, 1]) drawn from ``gen``: random GT crops
    with random h/v flips and transposes, degraded per sample with blur (prob ``blur_prob``) →
    bilinear ↓ → noise (prob ``noise_prob``) → 8-bit quantisation."""
    p = cfg.patch_size
    crops = []
    for _ in range(cfg.batch_size):
        img = images[_randint(len(images), gen)]
        h, w = img.shape[-2:]
        top, left = _randint(h - p + 1, gen), _randint(w - p + 1, gen)
        crop = img[:, top:top + p, left:left + p]
        hflip, vflip, rot = (torch.rand(3, generator=gen) < 0.5).tolist()
        if hflip:
            crop = crop.flip(-1)
        if vflip:
            crop = crop.flip(-2)
        if rot:
            crop = crop.transpose(-1, -2)
        crops.append(crop)
    gt = torch.stack(crops).float().div_(255.0)
    b = cfg.batch_size
    blur_on = torch.rand(b, generator=gen) < cfg.blur_prob
    noise_on = torch.rand(b, generator=gen) < cfg.noise_prob
    x = gt
    if bool(blur_on.any()):
        x = torch.where(blur_on.view(b, 1, 1, 1), blur(gt, cfg.blur_sigma, cfg.kernel_size), gt)
    x = downsample(x, cfg.scale)
    if bool(noise_on.any()):
        x = torch.where(noise_on.view(b, 1, 1, 1), add_noise(x, cfg.noise_sigma, gen), x)
    return quantize(x), gt


# ---------------------------------------------------------------------------------------- model
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


def _lr_at(cfg: TrainConfig, it: int) -> float:
    """Learning rate for (0-based) iteration ``it``."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    eta_min = min(MIN_LR, cfg.lr)
    return eta_min + 0.5 * (cfg.lr - eta_min) * (1 + math.cos(math.pi * it / cfg.iters))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _check_param_mask(model: nn.Module, param_mask: dict[str, Tensor]) -> dict[str, Tensor]:
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


_COMPARED = ("arch", "preset", "scale", "iters", "batch_size", "patch_size", "lr", "ema_decay",
             "blur_prob", "noise_prob", "blur_sigma", "noise_sigma", "kernel_size", "seed",
             "model_kwargs", "lr_schedule")


@dataclass
class _Run:
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


def _new_run(cfg: TrainConfig, init: PathLike | None, param_mask: dict[str, Tensor] | None,
             device: torch.device) -> _Run:
    """Model (trainable parameters per ``param_mask``), its EMA copy, Adam and the batch generator."""
    model = build_model(cfg, init).to(device)
    mask = _check_param_mask(model, param_mask) if param_mask is not None else None
    params = dict(model.named_parameters())
    trainable = [n for n in params if mask is None or n in mask]
    for n, p in params.items():
        p.requires_grad_(n in trainable)
    optimizer = torch.optim.Adam([params[n] for n in trainable], lr=cfg.lr, betas=(0.9, 0.99))
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    return _Run(model, ema, optimizer, gen, mask, params, frozen={})


def _resume(run: _Run, cfg: TrainConfig, state_path: Path, device: torch.device) -> None:
    """Continue from ``state.pt`` when it exists (refused when written by another config or mask)."""
    if not state_path.exists():
        return
    try:
        state = torch.load(state_path, map_location=device, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read training state {str(state_path)!r}: {e}") from e
    saved = state.get("config", {})
    diff = [k for k in _COMPARED if saved.get(k) != cfg.to_dict()[k]]
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


def _trim_log(log_path: Path, start: int) -> None:
    """Keep only the log lines the saved state has reached (a killed run may have logged further)."""
    if log_path.exists():
        kept = [ln for ln in log_path.read_text().splitlines()
                if ln.strip() and start > 0 and json.loads(ln)["iter"] <= start]
        atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))


def _metadata(cfg: TrainConfig, init: PathLike | None, mask: dict[str, Tensor] | None) -> dict[str, Any]:
    """What the saved model's header records about its training."""
    return {"iters": cfg.iters, "preset": cfg.preset, "seed": cfg.seed, "lr": cfg.lr,
            "lr_schedule": cfg.lr_schedule, "blur_prob": cfg.blur_prob, "noise_prob": cfg.noise_prob,
            "blur_sigma": cfg.blur_sigma, "noise_sigma": cfg.noise_sigma,
            "kernel_size": cfg.kernel_size, "batch_size": cfg.batch_size,
            "patch_size": cfg.patch_size, "ema_decay": cfg.ema_decay,
            "init": str(init) if init is not None else None,
            "masked_params": sorted(mask) if mask is not None else None, "weights": "ema"}


def _step(run: _Run, cfg: TrainConfig, images: Sequence[Tensor], it: int, device: torch.device) -> tuple[float, float]:
    """One optimiser step at (0-based) iteration ``it`` and the EMA update; returns (loss, lr)."""
    lr = _lr_at(cfg, it)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    lq, gt = sample_batch(images, cfg, run.gen)
    loss = F.l1_loss(run.model(lq.to(device)), gt.to(device))
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params, mask = run.params, run.mask
    if mask is not None:
        for n, m in mask.items():
            if params[n].grad is not None:
                params[n].grad.mul_(m)
    run.optimizer.step()
    with torch.no_grad():
        if mask is not None:  # Adam on zero grads is an exact no-op; restore anyway, to be sure.
            for n, m in mask.items():
                params[n].copy_(torch.where(m, params[n], run.frozen[n]))
        t = it + 1  # updates done, this one included
        decay = min(cfg.ema_decay, (1 + t) / (10 + t))
        for pe, pm in zip(run.ema.parameters(), run.model.parameters()):
            pe.lerp_(pm, 1.0 - decay)  # lerp: an unchanged weight stays bit-identical in the EMA
        for be, bm in zip(run.ema.buffers(), run.model.buffers()):
            be.copy_(bm)
    loss_v = loss.item()
    if not math.isfinite(loss_v):
        raise FloatingPointError(f"training loss became {loss_v} at iteration {it + 1}")
    return loss_v, lr


def _loop(run: _Run, cfg: TrainConfig, images: Sequence[Tensor], paths: tuple[Path, Path], stop_at: int,
          device: torch.device, progress: bool, callback: Callable[[int, float], bool | None] | None
          ) -> tuple[int, float]:
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
                _atomic_torch_save(run.state(cfg, it, elapsed), state_path)
            if stop:
                break
    bar.close()
    return it, elapsed


def train(cfg: TrainConfig, data: DataSource, out_dir: PathLike, init: PathLike | None = None,
          param_mask: dict[str, Tensor] | None = None, progress: bool = True, *,
          max_iters_this_call: int | None = None,
          callback: Callable[[int, float], bool | None] | None = None) -> Path:
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
    if max_iters_this_call is not None and (isinstance(max_iters_this_call, bool) or not isinstance(
            max_iters_this_call, int) or max_iters_this_call < 1):
        raise InvalidInputError(f"max_iters_this_call must be None or an int >= 1, got {max_iters_this_call!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path, model_path, log_path = out_dir / "state.pt", out_dir / "model.safetensors", out_dir / "log.jsonl"
    device = torch.device(cfg.device)
    run = _new_run(cfg, init, param_mask, device)
    _resume(run, cfg, state_path, device)
    _trim_log(log_path, run.start)
    run.frozen = {n: run.params[n].detach().clone() for n in (run.mask or {})}
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


def train_pair(arch: str, preset: str, data: DataSource, out_dir: PathLike, *, seed: int = 0,
               scale: int = 2, baseline_iters: int | None = None, finetune_iters: int | None = None,
               progress: bool = True) -> tuple[Path, Path]:
    """Train a baseline (clean ×``scale``) into ``out_dir/baseline`` and fine-tune it with blur and
    noise (prob 0.5 each) into ``out_dir/target``; returns both ``model.safetensors`` paths. Both
    stages resume from their ``state.pt``."""
    if preset not in PRESETS:
        raise InvalidInputError(f"unknown training preset {preset!r}; valid presets: {sorted(PRESETS)}")
    p = {**PRESETS[preset], **PRESETS[preset].get("arch_overrides", {}).get(arch, {})}
    out_dir = Path(out_dir)
    common = dict(arch=arch, preset=preset, scale=scale, batch_size=p["batch_size"],
                  patch_size=p["patch_size"], seed=seed, log_every=p["log_every"],
                  ckpt_every=p["ckpt_every"], model_kwargs=dict(p["model_kwargs"].get(arch, {})))
    base_cfg = TrainConfig(iters=baseline_iters or p["baseline_iters"], lr=p["baseline_lr"], **common)
    base = train(base_cfg, data, out_dir / "baseline", progress=progress)
    tgt_cfg = TrainConfig(iters=finetune_iters or p["finetune_iters"], lr=p["finetune_lr"],
                          blur_prob=0.5, noise_prob=0.5, **common)
    target = train(tgt_cfg, data, out_dir / "target", init=base, progress=progress)
    return base, target
