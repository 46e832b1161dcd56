"""Turn whatever a loader or dataset yields into validated ``(lq, gt, labels, names)`` batches: the
one batch iterator (:func:`iterate_units`) and batching policy of every FAIG loop, the digests that
tie resumed work to its inputs, and the model's scale (declared, or measured by one forward pass).

Accepts tuples ``(lq, gt, label[, name])`` and dicts with keys ``lq``, ``gt``, ``label`` (and
optionally ``name``); tensors CHW or BCHW; labels a string or one string per sample.  Every check
names the batch and sample it failed on, so a bad image never becomes a silent wrong answer.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import Dataset, IterableDataset

from faig_fast.errors import InvalidInputError
from faig_fast.utils.tensors import update_digest


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
    if t.numel() == 0:
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


def normalize_batch(raw: Any, counter: int, where: str) -> Batch:
    """Validate one loader item (types, shapes, values, labels, names; not the scale: see
    :func:`check_sizes`); ``counter`` numbers the images for default names, ``where`` starts every error."""
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


#: Most images in one planned batch of a dataset (also the unit of work a killed resumable run can lose).
BATCH_ITEMS = 8


@dataclass
class Unit:
    """One batch of the run's plan: its number, the dataset positions of its images and, when loaded,
    its validated parts (same-size batches with their positions; one part unless sizes change inside)."""

    number: int
    positions: list[int]
    parts: list[tuple[list[int], Batch]] | None = None


def is_dataset(data: Any) -> bool:
    """True for a map-style dataset of single images (a ``torch.utils.data.Dataset`` with ``__len__``,
    or any sized, indexable object with ``item_name``); lists, DataLoaders and generators are loaders
    whose every item is a batch."""
    if isinstance(data, (list, tuple)) or isinstance(data, IterableDataset):
        return False
    sized = hasattr(data, "__getitem__") and hasattr(data, "__len__")
    return sized and (isinstance(data, Dataset) or hasattr(data, "item_name"))


def plan_batches(dataset: Sequence) -> list[list[int]]:
    """Consecutive items with the same GT size (``dataset.gt_size(i)``), at most :data:`BATCH_ITEMS`
    each; one item per batch when the dataset cannot tell sizes without loading the images."""
    size_of = getattr(dataset, "gt_size", None)
    if not callable(size_of):
        return [[i] for i in range(len(dataset))]
    plan: list[list[int]] = []
    key = None
    for i in range(len(dataset)):
        k = tuple(size_of(i))
        if not plan or k != key or len(plan[-1]) == BATCH_ITEMS:
            plan.append([])
        plan[-1].append(i)
        key = k
    return plan


Validator = Callable[[Batch, str], Batch]


def iterate_units(data: Iterable, check: Validator, wanted: Callable[[int], bool] = lambda j: True,
                  plan: list[list[int]] | None = None) -> Iterator[Unit]:
    """The one batch iterator of every FAIG loop.

    A loader's items are its batches (images named by the batch, else ``image<position>``); a dataset
    (:func:`is_dataset`) is cut by :func:`plan_batches` (images named ``dataset.item_name(i)``, else
    ``image<i>``; ``plan``, when given, is that plan already made).  ``check(batch, where)`` validates each batch (each dataset item) as it is loaded;
    units that ``wanted(number)`` declines are yielded without parts (a dataset does not load them).
    Raises if there are no images.
    """
    if data is None:
        raise InvalidInputError("loader is None: pass an iterable of (lq, gt, label) batches or a dataset")
    if is_dataset(data):
        units = _dataset_units(data, check, wanted, plan if plan is not None else plan_batches(data))
    else:
        units = _loader_units(data, check, wanted)
    count = 0
    for unit in units:
        count += len(unit.positions)
        yield unit
    if count == 0:
        raise InvalidInputError("the loader yielded no images: nothing to attribute")


def _loader_units(loader: Iterable, check: Validator, wanted: Callable[[int], bool]) -> Iterator[Unit]:
    count = 0
    for i, raw in enumerate(loader):
        where = f"batch {i}"
        b = normalize_batch(raw, count, where)
        positions = list(range(count, count + len(b)))
        count += len(b)
        yield Unit(i, positions, [(positions, check(b, where))] if wanted(i) else None)


def _dataset_units(dataset: Sequence, check: Validator, wanted: Callable[[int], bool],
                   plan: list[list[int]]) -> Iterator[Unit]:
    for j, indices in enumerate(plan):
        yield Unit(j, list(indices), _load_parts(dataset, indices, check) if wanted(j) else None)


def _load_parts(dataset: Sequence, indices: list[int], check: Validator) -> list[tuple[list[int], Batch]]:
    """Validated items ``indices`` of ``dataset``, stacked into batches split where tensor shapes change."""
    groups: list[list[tuple[int, Batch]]] = []
    for i in indices:
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 3:
            raise InvalidInputError(f"dataset item {i}: expected (lq, gt, label[, name]), got {type(item).__name__}")
        name = dataset.item_name(i) if hasattr(dataset, "item_name") else (item[3] if len(item) > 3 else None)
        where = f"item {i}"
        b = check(normalize_batch((item[0], item[1], item[2], name), i, where), where)
        if len(b) != 1:
            raise InvalidInputError(f"{where}: a dataset item must be one image, got a batch of {len(b)}")
        last = groups[-1][-1][1] if groups else None
        if last is not None and last.lq.shape[1:] == b.lq.shape[1:] and last.gt.shape[1:] == b.gt.shape[1:]:
            groups[-1].append((i, b))
        else:
            groups.append([(i, b)])
    return [([i for i, _ in g], Batch(torch.cat([b.lq for _, b in g]), torch.cat([b.gt for _, b in g]),
                                      [b.labels[0] for _, b in g], [b.names[0] for _, b in g])) for g in groups]


def iterate_batches(data: Iterable, scale: int | None) -> Iterator[Batch]:
    """Validated batches of a loader or dataset (see :func:`iterate_units`), gt checked against ``scale``."""
    def check(b: Batch, where: str) -> Batch:
        check_sizes(b.lq, b.gt, scale, where)
        return b

    for unit in iterate_units(data, check):
        for _, batch in unit.parts:
            yield batch


def unit_digest(unit: Unit) -> str:
    """SHA-256 of everything a unit feeds the run: positions, lq and gt (dtype, shape, bytes), labels,
    names.  A resumed batch is reused only when this matches, whatever the dataset says."""
    h = hashlib.sha256()
    for positions, b in unit.parts:
        h.update(json.dumps([positions, b.labels, b.names]).encode())
        for t in (b.lq, b.gt):
            update_digest(h, t)
    return h.hexdigest()


def plan_digest(plan: list[list[int]] | None) -> str | None:
    """SHA-256 of a dataset's batch plan (and :data:`BATCH_ITEMS`); None for loaders (no plan ahead)."""
    if plan is None:
        return None
    return hashlib.sha256(json.dumps([BATCH_ITEMS, plan]).encode()).hexdigest()


def data_fingerprint(data: Any) -> str | None:
    """The dataset's own fingerprint of everything that determines its tensors (``data.fingerprint()``,
    e.g. :meth:`~faig_fast.data.DegradedImageDataset.fingerprint`); None when it has none."""
    fp = getattr(data, "fingerprint", None)
    return str(fp()) if callable(fp) else None


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


def probe_output(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, where: str) -> tuple[int, ...]:
    """Output shape (C, H, W) of ``forward`` on the one-image batch ``x``, without gradients; a model
    that cannot run on it raises :class:`InvalidInputError` naming ``where`` and the input shape."""
    try:
        with torch.no_grad():
            out = forward(x)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise InvalidInputError(f"{where}: the model cannot run on lq of shape {tuple(x.shape[1:])}: {e}") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise InvalidInputError(f"{where}: the model must return one BCHW image tensor, got "
                                f"{getattr(out, 'shape', type(out).__name__)}")
    return tuple(out.shape[1:])


def resolve_scale(model: torch.nn.Module, channels: int = 3, where: str = "model", size: int = 24) -> int:
    """The model's scale before any data exists (to build a dataset that makes LQ from GT): its declared
    one (:func:`model_scale`), else measured like :class:`~faig_fast.core.attributor.Attributor` does,
    by :func:`probe_output` and :func:`infer_scale`, on a private eval copy with a (1, ``channels``,
    ``size``, ``size``) input."""
    scale = model_scale(model)
    if scale is not None:
        return scale
    probe = copy.deepcopy(model).eval()
    dtype = next((p.dtype for p in probe.parameters() if p.is_floating_point()), torch.float32)
    x = torch.full((1, channels, size, size), 0.5, dtype=dtype)
    out = probe_output(probe, x, f"{where} (declares no scale; measuring it)")
    return infer_scale((size, size), out[-2:], where)
