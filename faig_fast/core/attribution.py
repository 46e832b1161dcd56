"""The result of a FAIG run: per-degradation filter scores, Eq. 7, rankings, and persistence."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors import safe_open

from faig_fast.utils.io import atomic_save_safetensors, atomic_write_text
from faig_fast.errors import FAIGError, InvalidInputError
from faig_fast.core.filters import ChannelInfo, FilterIndex, FilterInfo, LayerInfo

FORMAT = "faig_fast.core.attribution/2"
"""Version 2 records each layer's kind and groups (needed for ``by="channel"``)."""
READABLE_FORMATS = ("faig_fast.core.attribution/1", FORMAT)

#: Version of what one run's numbers mean (scores, sums, resume files); part of every run key.
RUN_FORMAT = "faig_fast.run/1"
#: What decides a run's numbers besides its images: runs that differ in any of these never combine.
COMPUTE_FIELDS = ("rule", "precision", "mode", "filters", "model_a_sha256", "model_b_sha256", "scale", "run_format")


def run_key(meta: dict, data: str | None, plan: str | None) -> dict:
    """The canonical key of a run: its :data:`COMPUTE_FIELDS` (from ``meta``), the dataset's fingerprint
    ``data`` and the digest of its batch plan ``plan`` (None where the source has none).  The resume
    manifest, :meth:`Attribution.merge` and the torchrun reduction all compare this one key."""
    key = {f: meta.get(f) for f in COMPUTE_FIELDS}
    key["run_format"] = RUN_FORMAT
    key.update(data=data, plan=plan)
    return key


def key_difference(a: dict, b: dict, fields: Sequence[str] | None = None) -> str | None:
    """``"field: x vs y"`` for the first of ``fields`` (default: all of both) where two keys differ."""
    for f in fields if fields is not None else list(dict.fromkeys([*a, *b])):
        if a.get(f) != b.get(f):
            return f"{f}: {a.get(f)!r} vs {b.get(f)!r}"
    return None


class Attribution:
    """Per-degradation sums of per-image filter scores Σ_kk |FAIG_i|, with image counts.

    ``scores(D)`` is Eq. 7: the mean score over images labelled ``D`` minus the mean over all
    images not labelled ``D``.  Per-image scores and convergence deltas are kept when requested.

    Every query takes ``by="filter"`` (default), ``"channel"`` (one score per output channel or
    neuron: the sum of its filters' scores) or ``"layer"`` (the sum over the layer); ``units(by)``
    labels the entries.  Eq. 7 is linear, so aggregating per-filter Eq. 7 equals Eq. 7 of the
    aggregated sums.
    """

    def __init__(self, index: FilterIndex, meta: dict | None = None, keep_per_image: bool = False):
        self.index = index
        self.meta: dict = dict(meta or {})
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.keep_per_image = keep_per_image
        self.image_names: list[str] = []
        self.image_labels: list[str] = []
        self.image_scores: list[torch.Tensor] = []
        self.convergence_delta: list[float] = []

    # accumulation -----------------------------------------------------------------------------
    def add(self, label: str, scores: torch.Tensor, name: str = "", delta: float | None = None) -> None:
        """Add one image's per-filter scores (1-D, ``len(self.index)`` long)."""
        scores = scores.detach().to("cpu", torch.float64).reshape(-1)
        if scores.numel() != len(self.index):
            raise FAIGError(f"scores for '{name}' have {scores.numel()} filters, expected {len(self.index)}")
        self.add_sums({label: scores})
        self.record(label, name, delta)
        if self.keep_per_image:
            self.image_scores.append(scores.clone())

    def record(self, label: str, name: str = "", delta: float | None = None) -> None:
        """Count one image whose scores reach ``sums`` separately (see :meth:`add_sums`)."""
        self.sums.setdefault(label, torch.zeros(len(self.index), dtype=torch.float64))
        self.counts[label] = self.counts.get(label, 0) + 1
        self.image_names.append(name)
        self.image_labels.append(label)
        if delta is not None:
            self.convergence_delta.append(float(delta))

    def add_sums(self, sums: dict[str, torch.Tensor]) -> None:
        """Add per-degradation score sums accumulated elsewhere (e.g. on the device)."""
        for label, s in sums.items():
            s = s.detach().to("cpu", torch.float64).reshape(-1)
            if s.numel() != len(self.index):
                raise FAIGError(f"sums for '{label}' have {s.numel()} filters, expected {len(self.index)}")
            if label in self.sums:
                self.sums[label] += s
            else:
                self.sums[label] = s.clone()

    def merge(self, other: "Attribution") -> "Attribution":
        """Combine two partial results over disjoint images (e.g. shards of one run, or runs of one
        model pair and settings over different images), in place; per-image lists are concatenated
        (``self``'s images first).  Refuses results of different runs (rule, precision, mode, filters,
        models, scale: :data:`COMPUTE_FIELDS`) and the same images twice."""
        if other.index != self.index:
            raise FAIGError("cannot merge attributions of different models (their filter indices differ)")
        self._check_mergeable(other)
        if self.image_names and other.image_names and bool(self.image_scores) != bool(other.image_scores):
            raise FAIGError("cannot merge an attribution with per-image scores and one without")
        if not self.image_names and other.image_names:
            self.keep_per_image = other.keep_per_image
        for label, s in other.sums.items():
            self.sums[label] = self.sums[label] + s if label in self.sums else s.clone()
            self.counts[label] = self.counts.get(label, 0) + other.counts[label]
        self.image_names += other.image_names
        self.image_labels += other.image_labels
        self.image_scores += other.image_scores
        self.convergence_delta += other.convergence_delta
        return self

    def _check_mergeable(self, other: "Attribution") -> None:
        mine, theirs = self.meta.get("run_key") or self.meta, other.meta.get("run_key") or other.meta
        common = [f for f in COMPUTE_FIELDS if f in mine and f in theirs]
        diff = key_difference(mine, theirs, common)
        if diff is not None:
            raise FAIGError(f"cannot merge attributions of different runs ({diff}): their scores do not add up")
        if mine.get("data") is not None and mine.get("data") == theirs.get("data"):
            both = set(self.image_names) & set(other.image_names)
            if both:
                raise FAIGError(f"cannot merge two attributions of the same dataset that share images "
                                f"(e.g. '{sorted(both)[0]}'): each image would count twice")

    # queries ----------------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        return sorted(self.sums)

    @property
    def filters(self) -> list[FilterInfo]:
        """(layer, out channel, in channel, flat index) of every filter, in flat-index order."""
        return list(self.index)

    def units(self, by: str = "filter") -> list[FilterInfo] | list[ChannelInfo] | list[LayerInfo]:
        """Labels of the entries of ``scores(..., by=by)``: filters, (layer, channel) pairs or layers."""
        return self.index.units(by)

    def _check_label(self, label: str) -> None:
        if label not in self.sums:
            raise InvalidInputError(f"unknown degradation label '{label}'; this attribution has {self.labels}")

    def mean(self, label: str, *, by: str = "filter") -> torch.Tensor:
        """Mean score over the images labelled ``label``, per filter, channel or layer."""
        self._check_label(label)
        return self.index.aggregate(self.sums[label] / self.counts[label], by)

    def scores(self, label: str, subtract_others: bool = True, *, by: str = "filter") -> torch.Tensor:
        """Eq. 7 for degradation ``label`` (float64, one value per ``by``-unit, see :meth:`units`)."""
        self._check_label(label)
        m = self.sums[label] / self.counts[label]
        others = [l for l in self.sums if l != label]
        if subtract_others and others:
            m = m - sum(self.sums[l] for l in others) / sum(self.counts[l] for l in others)
        return self.index.aggregate(m, by)

    def ranking(self, label: str, subtract_others: bool = True, *, by: str = "filter") -> torch.Tensor:
        """Unit indices (flat filter indices for ``by="filter"``) by descending score; ties keep index order."""
        return torch.sort(self.scores(label, subtract_others, by=by), descending=True, stable=True).indices

    def top(self, label: str, fraction: float = 0.01, subtract_others: bool = True, *,
            by: str = "filter") -> torch.Tensor:
        """The top ``fraction`` of filters (channels, layers) for ``label`` (at least one)."""
        return self.ranking(label, subtract_others, by=by)[: top_count(self.index.num_units(by), fraction)]

    def image_ranking(self, i: int, *, by: str = "filter") -> torch.Tensor:
        """Ranking of image ``i``'s own scores (Eq. 6, used by degradation prediction)."""
        if not self.image_scores:
            raise FAIGError("per-image scores were not kept: call attribute(..., keep_per_image=True)")
        return torch.sort(self.index.aggregate(self.image_scores[i], by), descending=True, stable=True).indices

    def __repr__(self) -> str:
        counts = ", ".join(f"{l}: {self.counts[l]}" for l in self.labels)
        return f"Attribution({len(self.index)} filters; images {{{counts}}})"

    # persistence ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write safetensors + JSON metadata atomically (the previous file survives a failure)."""
        path = Path(path)
        tensors = {f"sum/{l}": s.contiguous() for l, s in self.sums.items()}
        if self.image_scores:
            tensors["per_image"] = torch.stack(self.image_scores).contiguous()
        header = {
            "format": FORMAT,
            "filters": self.index.to_json(),
            "counts": self.counts,
            "image_names": self.image_names,
            "image_labels": self.image_labels,
            "convergence_delta": self.convergence_delta,
            "keep_per_image": self.keep_per_image,
            "meta": self.meta,
        }
        atomic_save_safetensors(tensors, {"faig_fast": json.dumps(header)}, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Attribution":
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["faig_fast"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise InvalidInputError(f"attribution file not found: {path}") from None
        except Exception as e:  # safetensors raises its own types for corrupt files
            raise InvalidInputError(f"{path} is not a readable faig_fast attribution file: {e}") from None
        if header.get("format") not in READABLE_FORMATS:
            raise InvalidInputError(f"{path}: unknown attribution format {header.get('format')!r}; "
                                    f"this version reads {list(READABLE_FORMATS)}")
        a = cls(FilterIndex.from_json(header["filters"]), header["meta"], header["keep_per_image"])
        a.counts = {k: int(v) for k, v in header["counts"].items()}
        a.sums = {l: tensors[f"sum/{l}"] for l in a.counts}
        a.image_names = header["image_names"]
        a.image_labels = header["image_labels"]
        a.convergence_delta = header["convergence_delta"]
        if "per_image" in tensors:
            a.image_scores = list(tensors["per_image"].unbind(0))
        n = len(a.index)
        if any(s.shape != (n,) for s in a.sums.values()) or any(s.shape != (n,) for s in a.image_scores):
            raise InvalidInputError(f"{path}: score vectors do not match its filter index of {n} filters")
        return a


def top_count(num_filters: int, fraction: float) -> int:
    """How many filters the top ``fraction`` holds: ⌊fraction·n⌋, at least one."""
    if not 0 < fraction <= 1:
        raise InvalidInputError(f"fraction must lie in (0, 1], got {fraction}")
    return max(1, int(math.floor(fraction * num_filters + 1e-9)))


def jaccard(a: Iterable[int] | torch.Tensor, b: Iterable[int] | torch.Tensor) -> float:
    """|a ∩ b| / |a ∪ b| of two index sets."""
    sa = set(a.tolist() if isinstance(a, torch.Tensor) else a)
    sb = set(b.tolist() if isinstance(b, torch.Tensor) else b)
    return len(sa & sb) / max(1, len(sa | sb))


def read_index_file(path: str | os.PathLike) -> torch.Tensor:
    """Read an authors'-style neuron-search index ``.txt`` (integers separated by whitespace/commas)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise InvalidInputError(f"cannot read index file {path}: {e}") from None
    tokens = text.replace(",", " ").replace("[", " ").replace("]", " ").split()
    try:
        return torch.tensor([int(float(t)) for t in tokens], dtype=torch.long)
    except ValueError as e:
        raise InvalidInputError(f"{path} is not an index file of integers: {e}") from None


def write_index_file(indices: Sequence[int] | torch.Tensor, path: str | os.PathLike) -> None:
    """Write indices one per line, as the authors' scripts do."""
    vals = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
    atomic_write_text(path, "".join(f"{int(v)}\n" for v in vals))

