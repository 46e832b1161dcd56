"""Finished batches of a resumable run, one safetensors file each, written atomically.

The folder's manifest (``run.json``) holds the run's canonical key
(:func:`~faig_fast.core.attribution.run_key`: rule, precision, mode, filters, both model hashes, scale,
the dataset's fingerprint, the batch plan, the format version); a folder of another run is refused
with a clear error.  Each batch file also holds the digest of the batch's actual inputs
(:func:`~faig_fast.core.batches.unit_digest`), compared on load: a batch made from other inputs is
recomputed, never reused, even for a dataset that cannot fingerprint itself.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from faig_fast.core.attribution import key_difference
from faig_fast.core.batches import Unit
from faig_fast.errors import InvalidInputError
from faig_fast.utils.io import atomic_save_safetensors, atomic_write_json

_META_KEY = "faig_fast_batch"
_HINTS = {"data": ": the dataset's fingerprint — its image files or how they are degraded (degradations, seed, "
                  "crop, scale, channels) changed",
          "plan": ": the batches the dataset is cut into changed"}


@dataclass
class BatchRecord:
    """A finished batch on the host: its images, their completeness checks and, when computed for a
    resumable run, its per-degradation partial sums, per-image scores and input digest."""

    positions: list[int]
    labels: list[str]
    names: list[str]
    checks: list
    sums: dict[str, torch.Tensor] | None = None
    scores: torch.Tensor | None = None
    digest: str | None = None


class ResumeStore:
    """The batch files of one run in ``folder``; anything unreadable, foreign or made from other inputs
    there is recomputed, never trusted."""

    def __init__(self, folder: str | os.PathLike, key: dict, num_filters: int, rank: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.num_filters = num_filters
        manifest = self.folder / "run.json"
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError):
                old = None  # torn or foreign: rewritten below
            if isinstance(old, dict) and old != key:
                diff = key_difference(old, key)
                hint = _HINTS.get(diff.split(":")[0], "") if diff else ""
                raise InvalidInputError(f"{self.folder} holds a run with other settings, models or images ({diff}"
                                        f"{hint}); use a fresh resume folder (--resume-dir)")
        if rank == 0:
            atomic_write_json(manifest, key)

    def path(self, unit: Unit) -> Path:
        return self.folder / f"batch{unit.positions[0]:06d}.safetensors"

    def load(self, unit: Unit, digest: str) -> BatchRecord | None:
        """The stored record of ``unit`` if it is intact and was made from inputs with ``digest``."""
        path = self.path(unit)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            rec = BatchRecord(list(meta["positions"]), list(meta["labels"]), list(meta["names"]),
                              [tuple(c) if c is not None else None for c in meta["checks"]],
                              {l: tensors[f"sum/{j}"] for j, l in enumerate(meta["sum_labels"])}, tensors["scores"],
                              meta["digest"])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return None
        n = len(unit.positions)
        ok = (rec.digest == digest and rec.positions == unit.positions
              and len(rec.labels) == len(rec.names) == len(rec.checks) == n
              and rec.scores.shape == (n, self.num_filters) and rec.scores.dtype == torch.float64
              and all(s.shape == (self.num_filters,) and s.dtype == torch.float64 for s in rec.sums.values())
              and set(rec.sums) == set(rec.labels))
        return rec if ok else None

    def save(self, unit: Unit, rec: BatchRecord) -> None:
        labels = list(rec.sums)
        tensors = {f"sum/{j}": rec.sums[l].contiguous() for j, l in enumerate(labels)}
        tensors["scores"] = rec.scores.contiguous()
        meta = {"positions": rec.positions, "labels": rec.labels, "names": rec.names, "checks": rec.checks,
                "sum_labels": labels, "digest": rec.digest}
        atomic_save_safetensors(tensors, {_META_KEY: json.dumps(meta)}, self.path(unit))
