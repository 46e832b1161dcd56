"""Whether two models form a FAIG pair (one architecture, every shape, finite values), and their
provenance hashes."""
from __future__ import annotations

import hashlib
from itertools import chain
from typing import Iterator

import torch
from torch import nn

from faig_fast.errors import InvalidInputError, ModelMismatchError
from faig_fast.utils.tensors import first_nonfinite


def _tensors(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(kind, name, tensor) of every parameter (canonical names) and every buffer, persistent or not."""
    return chain((("parameter", n, p) for n, p in model.named_parameters()),
                 (("buffer", n, b) for n, b in model.named_buffers()))


def check_finite(model: nn.Module, role: str) -> None:
    """Raise if any floating parameter or buffer of ``model`` holds NaN or Inf (integer buffers are skipped)."""
    bad = first_nonfinite(((kind, name), t) for kind, name, t in _tensors(model))
    if bad is not None:
        raise InvalidInputError(f"{role} model: {bad[0]} '{bad[1]}' contains NaN or Inf")


def check_pair(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise :class:`ModelMismatchError` unless the models share an architecture, every parameter and
    buffer name (non-persistent buffers included), shape and kind (floating or not)."""
    if type(model_a) is not type(model_b):
        raise ModelMismatchError(
            f"model_a is {type(model_a).__name__} but model_b is {type(model_b).__name__}: "
            "the baseline and target must share one architecture")
    ta, tb = list(_tensors(model_a)), list(_tensors(model_b))
    for (kind, ka, xa), (_, kb, xb) in zip(ta, tb):
        if ka != kb:
            raise ModelMismatchError(f"{kind} names differ: model_a has '{ka}' where model_b has '{kb}'")
        if xa.shape != xb.shape:
            raise ModelMismatchError(
                f"{kind} '{ka}' has shape {tuple(xa.shape)} in model_a but {tuple(xb.shape)} in model_b")
        if xa.is_floating_point() != xb.is_floating_point():
            raise ModelMismatchError(f"{kind} '{ka}' is {xa.dtype} in model_a but {xb.dtype} in model_b")
    if len(ta) != len(tb):
        longer, (kind, name, _) = ("model_a", ta[len(tb)]) if len(ta) > len(tb) else ("model_b", tb[len(ta)])
        raise ModelMismatchError(f"only {longer} has {kind} '{name}'")
    check_finite(model_a, "model_a (baseline)")
    check_finite(model_b, "model_b (target)")


def model_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, shapes and float64 values), for provenance."""
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()
