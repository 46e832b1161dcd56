"""Checks on named tensors shared by checkpoint loading and pair validation."""
from __future__ import annotations

from typing import Any, Iterable

import torch


def first_nonfinite(named: Iterable[tuple[Any, torch.Tensor]]) -> Any:
    """Name of the first floating (or complex) tensor holding NaN or Inf; integer tensors are skipped."""
    for name, t in named:
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            return name
    return None


def update_digest(h: Any, t: torch.Tensor) -> None:
    """Feed ``t``'s dtype, shape and bytes into the hashlib object ``h`` (the one tensor hash of resume
    keys, dataset fingerprints and LAM records)."""
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.view(torch.uint8).numpy().tobytes())
