"""Whether two models form a FAIG pair (one architecture, every shape, finite values), and their
provenance hashes."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from faig_fast.errors import InvalidInputError, ModelMismatchError


def check_finite(model: nn.Module, role: str) -> None:
    """Raise if any parameter or buffer of ``model`` holds NaN or Inf."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidInputError(f"{role} model: parameter '{name}' contains NaN or Inf")


def check_pair(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise :class:`ModelMismatchError` unless the models share an architecture and every shape."""
    if type(model_a) is not type(model_b):
        raise ModelMismatchError(
            f"model_a is {type(model_a).__name__} but model_b is {type(model_b).__name__}: "
            "the baseline and target must share one architecture")
    sa, sb = model_a.state_dict(), model_b.state_dict()
    for (ka, ta), (kb, tb) in zip(sa.items(), sb.items()):
        if ka != kb:
            raise ModelMismatchError(f"parameter names differ: model_a has '{ka}' where model_b has '{kb}'")
        if ta.shape != tb.shape:
            raise ModelMismatchError(
                f"parameter '{ka}' has shape {tuple(ta.shape)} in model_a but {tuple(tb.shape)} in model_b")
    if len(sa) != len(sb):
        longer, name = ("model_a", list(sa)[len(sb)]) if len(sa) > len(sb) else ("model_b", list(sb)[len(sa)])
        raise ModelMismatchError(f"only {longer} has parameter '{name}'")
    check_finite(model_a, "model_a (baseline)")
    check_finite(model_b, "model_b (target)")


def model_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, shapes and float64 values), for provenance."""
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()
