"""Re-training only the discovered filters (paper Sec. 5.2.2, Table 3).

From the baseline model, only the selected filters (the K×K slices ``weight[out, in]`` given by flat
filter indices, numbered as ``faig_fast.core.filters.FilterIndex``) are re-trained on one degradation,
while every other weight and every bias stays exactly as in the baseline. ``filter_indices=None``
re-trains all parameters: the table's upper bound.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import Tensor, nn

from faig_fast.errors import InvalidInputError
from faig_fast.core.filters import FilterIndex
from faig_fast.models import load_model, read_metadata
from faig_fast.training import TrainConfig, train

__all__ = ["filter_mask", "retrain_filters", "RETRAIN_DEGRADATIONS"]

PathLike = Union[str, "os.PathLike[str]"]

#: degradation label → (blur_prob, noise_prob) used for re-training
RETRAIN_DEGRADATIONS: dict[str, tuple[float, float]] = {
    "blur": (1.0, 0.0), "noise": (0.0, 1.0), "blur+noise": (1.0, 1.0), "clean": (0.0, 0.0),
}


def filter_mask(model: nn.Module, filter_indices: Tensor | Sequence[int]) -> dict[str, Tensor]:
    """Weight-shaped float masks for every conv weight of ``model``: 1 on the K×K entries of each
    selected filter (flat indices: conv weights in state_dict order, row-major over (out, in)),
    0 elsewhere. Parameters without a key (biases, ...) are meant to stay frozen."""
    index = FilterIndex.from_model(model)
    rows = index.split(filter_indices)
    masks: dict[str, Tensor] = {}
    for layer in index.layers:
        m = torch.zeros(layer.num_filters, layer.kk, dtype=torch.float32)
        if layer.name in rows:
            m[rows[layer.name]] = 1.0
        masks[layer.name] = m.view(layer.shape).contiguous()
    return masks


def retrain_filters(baseline_path: PathLike, filter_indices: Tensor | Sequence[int] | None,
                    degradation: str, data: PathLike | Sequence[PathLike], out_dir: PathLike, *,
                    iters: int, seed: int = 0, lr: float = 5e-5, batch_size: int = 16,
                    patch_size: int = 64, progress: bool = True) -> Path:
    """Re-train the baseline at ``baseline_path`` on ``degradation`` ("blur" or "noise", applied to
    every sample) updating only the filters ``filter_indices`` (None: all parameters, the upper
    bound); returns ``out_dir/model.safetensors``. Resumable (see :func:`faig_fast.training.train`)."""
    if degradation not in RETRAIN_DEGRADATIONS:
        raise InvalidInputError(
            f"unknown degradation {degradation!r}; valid: {sorted(RETRAIN_DEGRADATIONS)}")
    blur_prob, noise_prob = RETRAIN_DEGRADATIONS[degradation]
    baseline = load_model(baseline_path)
    meta = read_metadata(baseline_path)
    mask = None if filter_indices is None else filter_mask(baseline, filter_indices)
    cfg = TrainConfig(
        arch=baseline.arch_name, preset=str(meta.get("preset", "custom")),
        scale=int(getattr(baseline, "upscale", 2)), iters=iters, batch_size=batch_size,
        patch_size=patch_size, lr=lr, blur_prob=blur_prob, noise_prob=noise_prob, seed=seed,
        log_every=max(1, min(50, iters // 20 or 1)), ckpt_every=max(1, min(1000, iters // 4 or 1)),
    )
    for key in ("blur_sigma", "noise_sigma", "kernel_size"):
        if key in meta:
            setattr(cfg, key, type(getattr(cfg, key))(meta[key]))
    return train(cfg, data, out_dir, init=baseline_path, param_mask=mask, progress=progress)
