"""Which parameters are filters, how they are numbered, and how filters group into channels and layers.

A *filter* is one K×K slice ``weight[i, j]`` of a convolution weight (the paper's footnote 2).
Flat filter indices follow the authors' released neuron-search index files: weights in
``state_dict`` order, row-major over the weight's dims (0, 1).  Biases are not filters.

``filters="conv"`` (the default, the paper's choice) takes the weight of every Conv and ConvTranspose
module; ``filters="conv+linear"`` adds every ``nn.Linear`` weight (and the input projections of
``nn.MultiheadAttention``), each element a 1×1 filter, as a 1×1 convolution's would be.

Names are *canonical parameter names* (the name in ``model.named_parameters()``, which keeps the first
name of a tied tensor): the engine keys its gradients by them.  A tied tensor is one layer, whose kind is
that of the first module (in ``named_modules()`` order) that uses it.  A weight under
``torch.nn.utils.parametrizations`` (e.g. weight norm) lives in the parametrization's original tensor
that has the weight's shape (``conv.parametrizations.weight.original1`` for weight norm), the deprecated
hook forms (``torch.nn.utils.weight_norm``/``spectral_norm``) in ``weight_v``/``weight_orig``.

Weight layouts: Conv ``(out, in/groups, *k)``, ConvTranspose ``(in, out/groups, *k)``, Linear
``(out, in)``.  :class:`FilterInfo` always reports the *true* output and input channel of a filter
(for a grouped conv the input channel of ``weight[o, j]`` is ``(o // (out/groups))·(in/groups) + j``),
whatever the layout; the flat numbering never depends on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from faig_fast.errors import InvalidInputError

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

FILTER_SETS = ("conv", "conv+linear")
"""Accepted values of ``filters=``."""
GRANULARITIES = ("filter", "channel", "layer")
"""Accepted values of ``by=``: one score per filter, per output channel (neuron), or per layer."""
LAYER_KINDS = ("conv", "conv_transpose", "linear")


class FilterInfo(NamedTuple):
    """One filter: its layer, true output and input channel, and flat index."""

    layer: str
    out_channel: int
    in_channel: int
    index: int


class ChannelInfo(NamedTuple):
    """One output channel (neuron) of a layer, with its position among ``by="channel"`` units."""

    layer: str
    channel: int
    index: int


class LayerInfo(NamedTuple):
    """One layer, with its kind and its position among ``by="layer"`` units."""

    layer: str
    kind: str | None
    index: int


@dataclass(frozen=True)
class ConvLayer:
    """A weight seen as a block of filters: ``shape[0] * shape[1]`` filters of ``kk`` weights.

    ``kind`` is ``"conv"``, ``"conv_transpose"`` or ``"linear"`` (``None``: not recorded, as in
    attribution files of format 1; labelled like a conv and not aggregable per channel).
    """

    name: str
    shape: tuple[int, ...]
    start: int
    kind: str | None = "conv"
    groups: int = 1

    @property
    def num_filters(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def kk(self) -> int:
        n = 1
        for s in self.shape[2:]:
            n *= s
        return n

    @property
    def out_channels(self) -> int:
        return self.groups * self.shape[1] if self.kind == "conv_transpose" else self.shape[0]

    def info(self, row: int) -> FilterInfo:
        """The filter at local row ``row`` of ``weight.reshape(num_filters, -1)``, with true channels."""
        a, b = divmod(row, self.shape[1])
        per_group = self.shape[0] // self.groups  # dim-0 channels per group
        true = (a // per_group) * self.shape[1] + b  # channel of dim 1 counted over all groups
        if self.kind == "conv_transpose":
            return FilterInfo(self.name, true, a, self.start + row)
        return FilterInfo(self.name, a, true, self.start + row)

    def channel_of_rows(self) -> torch.Tensor:
        """Output channel of each local row (int64, ``num_filters`` long)."""
        if self.kind is None:
            raise InvalidInputError(
                f"layer '{self.name}': its kind (conv or conv_transpose) was not recorded (attribution file "
                "format 1), so its output channels are unknown; set `result.index = "
                "FilterIndex.from_model(model_target)` or recompute the attribution")
        rows = torch.arange(self.num_filters, dtype=torch.long)
        a, b = rows // self.shape[1], rows % self.shape[1]
        if self.kind == "conv_transpose":
            return (a // (self.shape[0] // self.groups)) * self.shape[1] + b
        return a

    def check(self) -> None:
        """Raise :class:`InvalidInputError` for an inconsistent description (e.g. a corrupt file)."""
        where = f"filter layer '{self.name}' {list(self.shape)}"
        if self.kind is not None and self.kind not in LAYER_KINDS:
            raise InvalidInputError(f"{where}: unknown kind {self.kind!r}; expected one of {LAYER_KINDS}")
        if len(self.shape) < 2 or any(s < 1 for s in self.shape) or (self.kind == "linear" and len(self.shape) != 2):
            raise InvalidInputError(f"{where}: not a {self.kind or 'conv'} weight shape")
        if self.groups < 1 or self.shape[0] % self.groups:
            raise InvalidInputError(f"{where}: {self.groups} groups do not divide dim 0")


class FilterIndex:
    """The flat numbering of every filter of a model, and its channel and layer groupings."""

    def __init__(self, layers: Sequence[tuple]):
        """``layers``: ``(name, shape[, kind[, groups]])`` in numbering order (kind defaults to conv)."""
        self.layers: list[ConvLayer] = []
        start = 0
        for name, shape, *rest in layers:
            kind = rest[0] if rest else "conv"
            groups = int(rest[1]) if len(rest) > 1 else 1
            layer = ConvLayer(str(name), tuple(int(s) for s in shape), start, kind, groups)
            layer.check()
            self.layers.append(layer)
            start += layer.num_filters
        self.num_filters = start
        self._unit_ids: dict[str, torch.Tensor] = {}

    @classmethod
    def from_model(cls, model: nn.Module, filters: str = "conv") -> "FilterIndex":
        """The filters of ``model``: ``"conv"`` (every Conv/ConvTranspose weight) or ``"conv+linear"``."""
        layers = filter_layers(model, filters)
        if not layers:
            what = "convolution" if filters == "conv" else "convolution or linear"
            raise InvalidInputError(f"{type(model).__name__} has no {what} layers: FAIG attributes their filters")
        return cls(layers)

    def __len__(self) -> int:
        return self.num_filters

    def __iter__(self) -> Iterator[FilterInfo]:
        for layer in self.layers:
            for row in range(layer.num_filters):
                yield layer.info(row)

    def lookup(self, index: int) -> FilterInfo:
        """The filter with flat index ``index``."""
        if not 0 <= index < self.num_filters:
            raise InvalidInputError(f"filter index {index} out of range [0, {self.num_filters})")
        layer = self.layers[int(self.layer_of(torch.tensor([index]))[0])]
        return layer.info(index - layer.start)

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

    # granularities ----------------------------------------------------------------------------
    def unit_ids(self, by: str = "filter") -> torch.Tensor:
        """The ``by``-unit (filter, channel or layer position) of each flat filter index (int64)."""
        check_granularity(by)
        if by not in self._unit_ids:
            if by == "filter":
                ids = torch.arange(self.num_filters, dtype=torch.long)
            elif by == "layer":
                ids = torch.cat([torch.full((l.num_filters,), i, dtype=torch.long) for i, l in enumerate(self.layers)])
            else:
                parts, offset = [], 0
                for l in self.layers:
                    parts.append(l.channel_of_rows() + offset)
                    offset += l.out_channels
                ids = torch.cat(parts)
            self._unit_ids[by] = ids
        return self._unit_ids[by]

    def num_units(self, by: str = "filter") -> int:
        """How many filters, output channels or layers there are."""
        check_granularity(by)
        if by == "filter":
            return self.num_filters
        if by == "layer":
            return len(self.layers)
        self.unit_ids(by)  # raises for layers of unknown kind
        return sum(l.out_channels for l in self.layers)

    def units(self, by: str = "filter") -> list[FilterInfo] | list[ChannelInfo] | list[LayerInfo]:
        """The label of every ``by``-unit, in unit order (the order of :meth:`aggregate`'s output)."""
        if by == "filter":
            return list(self)
        if by == "layer":
            return [LayerInfo(l.name, l.kind, i) for i, l in enumerate(self.layers)]
        self.unit_ids(by)
        pairs = [(l.name, c) for l in self.layers for c in range(l.out_channels)]
        return [ChannelInfo(name, c, i) for i, (name, c) in enumerate(pairs)]

    def aggregate(self, values: torch.Tensor, by: str = "filter") -> torch.Tensor:
        """Sum per-filter ``values`` (last dim ``len(self)``) over each ``by``-unit (last dim ``num_units``)."""
        if values.shape[-1] != self.num_filters:
            raise InvalidInputError(f"values have {values.shape[-1]} filters, expected {self.num_filters}")
        if by == "filter":
            check_granularity(by)
            return values
        ids = self.unit_ids(by).to(values.device)
        out = values.new_zeros(*values.shape[:-1], self.num_units(by))
        return out.index_add_(values.dim() - 1, ids, values)

    # persistence ------------------------------------------------------------------------------
    def to_json(self) -> list[dict]:
        return [{"name": l.name, "shape": list(l.shape), "kind": l.kind, "groups": l.groups} for l in self.layers]

    @classmethod
    def from_json(cls, data: list) -> "FilterIndex":
        """Read :meth:`to_json`'s output; ``[name, shape]`` pairs (format 1) give layers of unknown kind."""
        try:
            layers = [(e["name"], tuple(e["shape"]), e["kind"], e["groups"]) if isinstance(e, dict)
                      else (e[0], tuple(e[1]), None, 1) for e in data]
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise InvalidInputError(f"not a filter index description: {e!r}") from None
        return cls(layers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FilterIndex) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"FilterIndex({len(self.layers)} layers, {self.num_filters} filters)"


def check_granularity(by: str) -> None:
    if by not in GRANULARITIES:
        raise InvalidInputError(f"by must be one of {GRANULARITIES}, got {by!r}")


def filter_layers(model: nn.Module, filters: str = "conv") -> list[tuple[str, tuple[int, ...], str, int]]:
    """``(canonical name, shape, kind, groups)`` of every filter weight, in ``named_parameters`` order."""
    if filters not in FILTER_SETS:
        raise InvalidInputError(f"filters must be one of {FILTER_SETS}, got {filters!r}")
    order: dict[int, tuple[int, str]] = {}
    for i, (n, p) in enumerate(model.named_parameters()):
        order[id(p)] = (i, n)
    found: dict[int, tuple[str, tuple[int, ...], str, int]] = {}
    for prefix, module in model.named_modules():
        for param, kind, groups in _module_weights(prefix, module, filters == "conv+linear"):
            if id(param) in found or id(param) not in order:  # tied (seen already), or not a parameter
                continue
            if isinstance(param, nn.parameter.UninitializedParameter):
                raise InvalidInputError(f"'{prefix}' is a lazy module whose weight is not initialised: "
                                        "run one forward pass before attributing")
            found[id(param)] = (order[id(param)][1], tuple(param.shape), kind, groups)
    return [found[k] for k in sorted(found, key=lambda k: order[k][0])]


def _module_weights(prefix: str, module: nn.Module, linear: bool) -> list[tuple[torch.Tensor, str, int]]:
    """The filter weights held by one module, with their kind and groups (none for other modules)."""
    if isinstance(module, _CONV_TYPES):
        shape = (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
        kind = "conv"
    elif isinstance(module, _CONV_TRANSPOSE_TYPES):
        shape = (module.in_channels, module.out_channels // module.groups, *module.kernel_size)
        kind = "conv_transpose"
    elif linear and isinstance(module, nn.Linear):
        shape, kind = (module.out_features, module.in_features), "linear"
    elif linear and isinstance(module, nn.MultiheadAttention):
        return [(p, "linear", 1) for n in _MHA_WEIGHTS if (p := module._parameters.get(n)) is not None]
    else:
        return []
    param = _weight_tensor(prefix, module, tuple(shape))
    return [] if param is None else [(param, kind, getattr(module, "groups", 1))]


def _weight_tensor(prefix: str, module: nn.Module, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The tensor holding ``module``'s weight values: the weight, or the original of its parametrization.

    Never evaluates a parametrization (spectral norm would update its state).
    """
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        names = ["original"] if plist.is_tensor else [f"original{i}" for i in range(plist.ntensors)]
        same = [n for n in names if tuple(getattr(plist, n).shape) == shape]
        if len(same) > 1 and type(plist[0]).__name__ == "_WeightNorm":
            same = ["original1"]  # (g, v): v holds the direction, i.e. the filters
        if len(same) != 1:
            raise InvalidInputError(
                f"'{prefix}.weight' is parametrized ({', '.join(type(p).__name__ for p in plist)}) and "
                f"{'none' if not same else 'several'} of its original tensors {names} have the weight's "
                f"shape {list(shape)}: cannot tell which one holds the filters")
        return getattr(plist, same[0])
    for name in ("weight", "weight_v", "weight_orig"):  # plain, weight_norm hook, spectral_norm hook
        p = module._parameters.get(name)
        if p is not None and (name == "weight" or tuple(p.shape) == shape):
            return p
    return None


def conv_weight_names(model: nn.Module) -> list[str]:
    """Canonical names of the conv (and conv-transpose) filter weights of ``model``, in numbering order."""
    return [l.name for l in FilterIndex.from_model(model).layers]
