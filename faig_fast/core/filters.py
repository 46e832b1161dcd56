"""Which parameters are filters, how they are numbered, and whether two models form a pair.

A *filter* is one K×K slice ``weight[out, in]`` of a convolution weight (the paper's footnote 2).
Flat filter indices follow the authors' released neuron-search index files: conv weights in
``state_dict`` order, row-major over (out, in).  Biases are not filters.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
from torch import nn

from faig_fast.errors import InvalidInputError, ModelMismatchError

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class FilterInfo(NamedTuple):
    """One filter: the conv weight it lives in, its (out, in) position and its flat index."""

    layer: str
    out_channel: int
    in_channel: int
    index: int


@dataclass(frozen=True)
class ConvLayer:
    """A conv weight seen as a block of filters: ``shape[0] * shape[1]`` filters of ``kk`` weights."""

    name: str
    shape: tuple[int, ...]
    start: int

    @property
    def num_filters(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def kk(self) -> int:
        n = 1
        for s in self.shape[2:]:
            n *= s
        return n


class FilterIndex:
    """The flat numbering of every filter of a model."""

    def __init__(self, layers: list[tuple[str, tuple[int, ...]]]):
        self.layers: list[ConvLayer] = []
        start = 0
        for name, shape in layers:
            layer = ConvLayer(name, tuple(int(s) for s in shape), start)
            self.layers.append(layer)
            start += layer.num_filters
        self.num_filters = start

    @classmethod
    def from_model(cls, model: nn.Module) -> "FilterIndex":
        names = conv_weight_names(model)
        sd = model.state_dict()
        return cls([(n, tuple(sd[n].shape)) for n in names])

    def __len__(self) -> int:
        return self.num_filters

    def __iter__(self) -> Iterator[FilterInfo]:
        for layer in self.layers:
            o, i = layer.shape[0], layer.shape[1]
            for a in range(o):
                for b in range(i):
                    yield FilterInfo(layer.name, a, b, layer.start + a * i + b)

    def lookup(self, index: int) -> FilterInfo:
        """The filter with flat index ``index``."""
        if not 0 <= index < self.num_filters:
            raise InvalidInputError(f"filter index {index} out of range [0, {self.num_filters})")
        for layer in self.layers:
            if index < layer.start + layer.num_filters:
                a, b = divmod(index - layer.start, layer.shape[1])
                return FilterInfo(layer.name, a, b, index)
        raise AssertionError("unreachable")

    def layer_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Layer position (0-based, in ``self.layers`` order) of each flat index."""
        bounds = torch.tensor([l.start + l.num_filters for l in self.layers], dtype=torch.long)
        return torch.bucketize(indices.to(torch.long), bounds, right=True)

    def to_json(self) -> list[list]:
        return [[l.name, list(l.shape)] for l in self.layers]

    @classmethod
    def from_json(cls, data: list) -> "FilterIndex":
        return cls([(name, tuple(shape)) for name, shape in data])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FilterIndex) and self.to_json() == other.to_json()


def conv_weight_names(model: nn.Module) -> list[str]:
    """Names of the conv weights of ``model`` in ``state_dict`` order."""
    conv = {f"{prefix}.weight" if prefix else "weight"
            for prefix, m in model.named_modules() if isinstance(m, _CONV_TYPES)}
    names = [k for k in model.state_dict().keys() if k in conv]
    if not names:
        raise InvalidInputError(f"{type(model).__name__} has no convolution layers: FAIG attributes conv filters")
    return names


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
