"""Which parameters are filters and how they are numbered.

A *filter* is one K×K slice ``weight[out, in]`` of a convolution weight (the paper's footnote 2).
Flat filter indices follow the authors' released neuron-search index files: conv weights in
``state_dict`` order, row-major over (out, in).  Biases are not filters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch
from torch import nn

from faig_fast.errors import InvalidInputError

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

    def split(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        """Flat indices grouped by layer: layer name → rows of ``weight.reshape(num_filters, -1)``.

        Raises :class:`InvalidInputError` for an index outside ``[0, len(self))``; layers with no
        selected filter are left out.  The one place flat indices are mapped back onto weights
        (masking, modulation and re-training all use it).
        """
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_filters):
            raise InvalidInputError(
                f"filter indices must lie in [0, {self.num_filters}), got range [{int(idx.min())}, {int(idx.max())}]")
        pos = self.layer_of(idx)
        out = {}
        for li, layer in enumerate(self.layers):
            local = idx[pos == li] - layer.start
            if local.numel():
                out[layer.name] = local
        return out

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
