"""Turn whatever a loader yields into validated ``(lq, gt, labels, names)`` batches.

Accepts tuples ``(lq, gt, label[, name])`` and dicts with keys ``lq``, ``gt``, ``label`` (and
optionally ``name``); tensors CHW or BCHW; labels a string or one string per sample.  Every check
names the batch and sample it failed on, so a bad image never becomes a silent wrong answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch

from faig_fast.errors import InvalidInputError


@dataclass
class Batch:
    lq: torch.Tensor  # (B, C_in, h, w) float in [0, 1]; any channel count (gray, RGB, RGB + noise map, ...)
    gt: torch.Tensor  # (B, C_out, h*s, w*s); C_out need not equal C_in
    labels: list[str]
    names: list[str]

    def __len__(self) -> int:
        return self.lq.shape[0]


def _as_images(t: Any, what: str, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{where}: {what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise InvalidInputError(f"{where}: {what} must be CHW or BCHW, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise InvalidInputError(f"{where}: {what} must be a float tensor in [0, 1], got dtype {t.dtype}")
    if t.shape[1] == 0 or t.shape[-1] == 0 or t.shape[-2] == 0:
        raise InvalidInputError(f"{where}: {what} is empty, shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InvalidInputError(f"{where}: {what} contains NaN or Inf")
    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidInputError(f"{where}: {what} values must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")
    return t


def _as_labels(label: Any, n: int, where: str) -> list[str]:
    if isinstance(label, str):
        labels = [label] * n if n == 1 else None
        if labels is None:
            raise InvalidInputError(f"{where}: a single label '{label}' for a batch of {n} images; give one per sample")
        return labels
    if isinstance(label, Sequence) and all(isinstance(x, str) for x in label):
        if len(label) != n:
            raise InvalidInputError(f"{where}: {len(label)} labels for {n} images")
        return list(label)
    raise InvalidInputError(f"{where}: label must be a string or a sequence of strings, got {type(label).__name__}")


def normalize_batch(raw: Any, index: int, scale: int | None, counter: int, where: str | None = None) -> Batch:
    """Validate one loader item; ``counter`` numbers images for default names, ``where`` (default
    ``"batch {index}"``) starts every error message."""
    where = where or f"batch {index}"
    name = None
    if isinstance(raw, dict):
        missing = [k for k in ("lq", "gt", "label") if k not in raw]
        if missing:
            raise InvalidInputError(f"{where}: dict batch lacks key(s) {missing}; needs 'lq', 'gt', 'label'")
        lq, gt, label, name = raw["lq"], raw["gt"], raw["label"], raw.get("name")
    elif isinstance(raw, (tuple, list)) and len(raw) in (3, 4):
        lq, gt, label = raw[:3]
        name = raw[3] if len(raw) == 4 else None
    else:
        raise InvalidInputError(f"{where}: expected a tuple (lq, gt, label) or a dict, got {type(raw).__name__}")
    lq = _as_images(lq, "lq", where)
    gt = _as_images(gt, "gt", where)
    n = lq.shape[0]
    if gt.shape[0] != n:
        raise InvalidInputError(f"{where}: {n} lq images but {gt.shape[0]} gt images")
    check_sizes(lq, gt, scale, where)
    labels = _as_labels(label, n, where)
    return Batch(lq, gt, labels, _as_names(name, n, counter, where))


def check_sizes(lq: torch.Tensor, gt: torch.Tensor, scale: int | None, where: str) -> None:
    """gt must be lq times ``scale`` on both axes; without a known scale, an integer multiple (equal on both)."""
    h, w = lq.shape[-2:]
    H, W = gt.shape[-2:]
    if scale is not None:
        if (H, W) != (h * scale, w * scale):
            raise InvalidInputError(
                f"{where}: gt size {H}x{W} is not lq size {h}x{w} times the model scale {scale}")
    elif H % h or W % w or H // h != W // w:
        raise InvalidInputError(f"{where}: gt size {H}x{W} is not an integer multiple of lq size {h}x{w}")


def _as_names(name: Any, n: int, counter: int, where: str) -> list[str]:
    if name is None:
        return [f"image{counter + i}" for i in range(n)]
    if isinstance(name, str):
        return [name] if n == 1 else [f"{name}[{i}]" for i in range(n)]
    if not isinstance(name, Sequence) or len(name) != n:
        got = f"{len(name)} names" if isinstance(name, Sequence) else f"a name of type {type(name).__name__}"
        raise InvalidInputError(f"{where}: {got} for {n} images; give one name per sample")
    return [str(x) for x in name]


def iterate_batches(loader: Iterable, scale: int | None) -> Iterator[Batch]:
    """Validated batches from ``loader``; raises if it yields nothing."""
    if loader is None:
        raise InvalidInputError("loader is None: pass an iterable of (lq, gt, label) batches")
    count = 0
    for i, raw in enumerate(loader):
        b = normalize_batch(raw, i, scale, count)
        count += len(b)
        yield b
    if count == 0:
        raise InvalidInputError("the loader yielded no images: nothing to attribute")


def model_scale(model: torch.nn.Module) -> int | None:
    """The model's upscaling factor when it declares one (a positive int ``upscale`` or ``scale``
    attribute); ``None`` otherwise (the API then infers it from one forward pass)."""
    for attr in ("upscale", "scale"):
        s = getattr(model, attr, None)
        if isinstance(s, int) and not isinstance(s, bool) and s >= 1:
            return s
    return None


def infer_scale(lq_size: tuple[int, int], out_size: tuple[int, int], where: str) -> int:
    """The integer factor that maps an input of ``lq_size`` onto the model's output ``out_size``."""
    (h, w), (H, W) = lq_size, out_size
    if H % h or W % w or H // h != W // w or H < h:
        raise InvalidInputError(
            f"{where}: cannot infer the model's scale: an input of {h}x{w} gives an output of {H}x{W}, "
            "not the same integer multiple on both axes (give the model an integer `upscale` attribute, "
            "or crop lq/gt so the output matches gt)")
    return H // h
