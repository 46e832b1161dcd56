"""PSNR evaluation of SR models on clean / blurry / noisy inputs (as in the paper's tables).

PSNR follows BasicSR's ``calculate_psnr`` on 8-bit RGB images: the prediction is clipped to [0, 1] and
rounded to 8-bit levels, the ground truth is taken at 8-bit levels, ``crop_border`` pixels are
dropped on each side (the scale, by convention), and the MSE is over all three channels.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor, nn

from faig_fast.data import DegradedImageDataset
from faig_fast.errors import InvalidInputError

__all__ = ["psnr", "evaluate", "psnr_table", "MAX_PSNR"]

MAX_PSNR = 100.0  # returned for identical images (MSE 0) instead of inf

PathLike = Union[str, "os.PathLike[str]"]


def _to_8bit(img: Tensor) -> Tensor:
    return torch.round(img.detach().to(torch.float64).clamp(0, 1) * 255.0)


def psnr(pred: Tensor, gt: Tensor, crop_border: int = 0) -> float:
    """PSNR (dB) of ``pred`` against ``gt`` (CHW or BCHW RGB in [0, 1]) at 8-bit precision, with
    ``crop_border`` pixels cropped on each side; ``MAX_PSNR`` (100) for identical images."""
    if not isinstance(pred, Tensor) or not isinstance(gt, Tensor):
        raise InvalidInputError("psnr expects two tensors")
    if pred.shape != gt.shape:
        raise InvalidInputError(f"psnr: shapes differ: {tuple(pred.shape)} vs {tuple(gt.shape)}")
    if pred.dim() < 2:
        raise InvalidInputError(f"psnr: expected an image tensor, got shape {tuple(pred.shape)}")
    if isinstance(crop_border, bool) or not isinstance(crop_border, int) or crop_border < 0:
        raise InvalidInputError(f"psnr: crop_border must be an int >= 0, got {crop_border!r}")
    if crop_border:
        h, w = pred.shape[-2:]
        if 2 * crop_border >= min(h, w):
            raise InvalidInputError(f"psnr: crop_border {crop_border} leaves nothing of a {h}x{w} image")
        pred = pred[..., crop_border:-crop_border, crop_border:-crop_border]
        gt = gt[..., crop_border:-crop_border, crop_border:-crop_border]
    mse = float(torch.mean((_to_8bit(pred) - _to_8bit(gt)) ** 2))
    if mse == 0:
        return MAX_PSNR
    return min(MAX_PSNR, 10.0 * math.log10(255.0 ** 2 / mse))


@torch.no_grad()
def evaluate(model: nn.Module, images: PathLike | Sequence[Any],
             labels: Sequence[str] = ("clean", "blur", "noise"), *, scale: int = 2, seed: int = 0,
             device: str | torch.device | None = None, max_side: int | None = None) -> dict[str, float]:
    """Mean PSNR of ``model`` per degradation label over ``images`` (a folder, image paths or
    ``(name, tensor)`` pairs; degraded by ``DegradedImageDataset`` with ``seed``). ``max_side``
    centre-crops each GT to at most ``max_side``² (for speed). Border of ``scale`` pixels ignored."""
    ds = DegradedImageDataset(images, tuple(labels), scale=scale, seed=seed, crop=max_side)
    if device is None:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = {lab: 0.0 for lab in ds.degradation_labels}
    counts = {lab: 0 for lab in ds.degradation_labels}
    try:
        for i in range(len(ds)):
            lq, gt, lab = ds[i]
            param = next(model.parameters(), None)
            dtype = param.dtype if param is not None else torch.float32
            sr = model(lq.unsqueeze(0).to(device=device, dtype=dtype)).float().cpu()[0]
            if sr.shape != gt.shape:
                raise InvalidInputError(
                    f"model output {tuple(sr.shape)} does not match the GT {tuple(gt.shape)} of "
                    f"{ds.item_name(i)}: is the model x{scale}?")
            sums[lab] += psnr(sr, gt, crop_border=scale)
            counts[lab] += 1
    finally:
        model.train(was_training)
    return {lab: sums[lab] / counts[lab] for lab in sums}


def psnr_table(models: Mapping[str, nn.Module], datasets: Mapping[str, Any], **kw: Any) -> str:
    """A Markdown table of ``evaluate`` results: one row per (model, dataset), one column per
    degradation label (``kw`` goes to ``evaluate``, e.g. ``labels=``, ``scale=``, ``max_side=``)."""
    labels = tuple(kw.pop("labels", ("clean", "blur", "noise")))
    lines = ["| model | dataset | " + " | ".join(labels) + " |",
             "|---|---|" + "---:|" * len(labels)]
    for mname, model in models.items():
        for dname, data in datasets.items():
            res = evaluate(model, data, labels, **kw)
            lines.append(f"| {mname} | {dname} | " + " | ".join(f"{res[l]:.3f}" for l in labels) + " |")
    return "\n".join(lines) + "\n"
