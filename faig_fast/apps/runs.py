"""Long FAIG runs over a dataset: the batch loop of :func:`faig_fast.attribute`, made resumable and
shardable.

The dataset is cut into a fixed plan of batches (consecutive items of equal size, at most
``BATCH_ITEMS``), which depends on the dataset alone.  Each batch goes through the same
:class:`~faig_fast.core.api.Attributor` machinery as ``faig_fast.attribute``: per-degradation sums
accumulate on the device and per-image scores reach the host only when ``keep_per_image`` asks.
With ``resume_dir`` every finished batch is written atomically (its per-degradation partial sums in
float64, per-image scores, names and completeness checks); a restarted run loads them and computes
only what is missing, and the totals are rebuilt by adding the partial sums in batch order — the
same float64 additions, in the same order, as the uninterrupted run's device accumulation, so the
sums are bit-identical.  Under ``torchrun`` rank r takes batches j ≡ r (mod world); sums and counts
are combined with ``all_reduce`` and per-image lists are gathered in dataset order.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from faig_fast.core.api import Attributor, LabelSums, record_images
from faig_fast.core.completeness import HostCheck, checks_to_host
from faig_fast.core.attribution import Attribution
from faig_fast.core.batches import Batch, normalize_batch
from faig_fast.errors import InvalidInputError
from faig_fast.utils.io import atomic_save_safetensors, atomic_write_json

#: Most items in one planned batch (also the unit of work a killed run can lose).
BATCH_ITEMS = 8
_META_KEY = "faig_fast_batch"


@dataclass
class BatchRecord:
    """A finished batch on the host: its items, their completeness checks, and (when computed per batch)
    its per-degradation partial sums and per-image scores."""

    indices: list[int]
    labels: list[str]
    names: list[str]
    checks: list
    sums: dict[str, torch.Tensor] | None = None
    scores: torch.Tensor | None = None


def plan_batches(dataset: Sequence) -> list[list[int]]:
    """Consecutive items with the same GT size (``dataset.gt_size(i)``), at most ``BATCH_ITEMS`` each;
    one item per batch when the dataset cannot tell sizes without loading the images."""
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


def _item_name(dataset: Sequence, i: int) -> str:
    return dataset.item_name(i) if hasattr(dataset, "item_name") else f"item{i}"


def load_batches(dataset: Sequence, indices: list[int], scale: int | None) -> list[tuple[list[int], Batch]]:
    """Validated batches of the items ``indices`` (split where the tensor shapes change)."""
    groups: list[list[tuple[int, Batch]]] = []
    for i in indices:
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 3:
            raise InvalidInputError(f"dataset item {i}: expected (lq, gt, label[, ...]), got {type(item).__name__}")
        b = normalize_batch((item[0], item[1], item[2], _item_name(dataset, i)), i, scale, i, where=f"item {i}")
        last = groups[-1][-1][1] if groups else None
        if last is not None and last.lq.shape[1:] == b.lq.shape[1:] and last.gt.shape[1:] == b.gt.shape[1:]:
            groups[-1].append((i, b))
        else:
            groups.append([(i, b)])
    return [([i for i, _ in g], Batch(torch.cat([b.lq for _, b in g]), torch.cat([b.gt for _, b in g]),
                                      [b.labels[0] for _, b in g], [b.names[0] for _, b in g])) for g in groups]


def _score(att: Attributor, dataset: Sequence, indices: list[int], sums: LabelSums | None,
           keep_scores: bool) -> BatchRecord:
    """Score one planned batch into its own device sums; those are added to the run's ``sums`` on the
    device, or (``sums`` None, for resume) returned on the host.  Either way the run's totals are
    ((0 + batch₁) + batch₂) + …, so a resumed run adds exactly what an uninterrupted one does."""
    own = LabelSums(len(att.index), att.engine.device)
    parts = []
    for idx, batch in load_batches(dataset, indices, att.scale):
        att.validate(batch, f"item {idx[0]}")
        parts.append(att.score_batch(batch, own, idx))
    checks = [c for p in parts for c in p.checks]
    rec = BatchRecord(list(indices), [l for p in parts for l in p.labels], [n for p in parts for n in p.names],
                      checks, scores=torch.cat([p.scores for p in parts]).cpu() if keep_scores else None)
    if sums is not None:
        sums.add(own)
    else:
        rec.checks, rec.sums = checks_to_host(checks), own.to_host()
    return rec


class ResumeStore:
    """Finished batches in ``folder``, one safetensors file each, written atomically; anything
    unreadable, foreign or stale there is recomputed, never trusted."""

    def __init__(self, folder: str | os.PathLike, att: Attributor, dataset: Sequence, rank: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.num_filters = len(att.index)
        key = {k: att.meta[k] for k in ("rule", "precision", "model_a_sha256", "model_b_sha256", "filters", "mode")}
        key["items"] = len(dataset)
        key["items_sha256"] = _dataset_fingerprint(dataset)
        key["batch_items"] = BATCH_ITEMS
        manifest = self.folder / "run.json"
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError):
                old = None  # torn or foreign: rewritten below
            if old is not None and old != key:
                raise InvalidInputError(
                    f"{self.folder} holds a run with other settings or models; use a fresh --resume-dir")
        if rank == 0:
            atomic_write_json(manifest, key)

    def path(self, indices: list[int]) -> Path:
        return self.folder / f"batch{indices[0]:06d}.safetensors"

    def load(self, indices: list[int]) -> BatchRecord | None:
        path = self.path(indices)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            rec = BatchRecord(list(meta["indices"]), list(meta["labels"]), list(meta["names"]),
                              [tuple(c) if c is not None else None for c in meta["checks"]],
                              {l: tensors[f"sum/{j}"] for j, l in enumerate(meta["sum_labels"])}, tensors["scores"])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            return None
        n = len(indices)
        ok = (rec.indices == list(indices) and len(rec.labels) == len(rec.names) == len(rec.checks) == n
              and rec.scores.shape == (n, self.num_filters) and rec.scores.dtype == torch.float64
              and all(s.shape == (self.num_filters,) and s.dtype == torch.float64 for s in rec.sums.values())
              and set(rec.sums) == set(rec.labels))
        return rec if ok else None

    def save(self, rec: BatchRecord) -> None:
        labels = list(rec.sums)
        tensors = {f"sum/{j}": rec.sums[l].contiguous() for j, l in enumerate(labels)}
        tensors["scores"] = rec.scores.contiguous()
        meta = {"indices": rec.indices, "labels": rec.labels, "names": rec.names, "checks": rec.checks,
                "sum_labels": labels}
        atomic_save_safetensors(tensors, {_META_KEY: json.dumps(meta)}, self.path(rec.indices))


def _dataset_fingerprint(dataset: Sequence) -> str | None:
    """SHA-256 of every item's name and label when the dataset can tell them without loading images."""
    labels = getattr(dataset, "labels", None)
    if not hasattr(dataset, "item_name") or not isinstance(labels, Sequence) or len(labels) != len(dataset):
        return None
    h = hashlib.sha256()
    for i in range(len(dataset)):
        h.update(f"{_item_name(dataset, i)}\0{labels[i]}\n".encode())
    return h.hexdigest()


def attribute_dataset(model_a: nn.Module, model_b: nn.Module, dataset: Sequence, *,
                      resume_dir: str | Path | None = None, keep_per_image: bool = False, progress: bool = False,
                      **kwargs) -> Attribution:
    """FAIG over an indexable dataset of ``(lq, gt, label)`` items, resumable and shardable.

    ``kwargs`` are those of :func:`faig_fast.attribute` (steps, method, strategy, precision, filters,
    mode, check_completeness, ...).  Every rank returns the full result.
    """
    if len(dataset) == 0:
        raise InvalidInputError("the dataset is empty: nothing to attribute")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    att = Attributor(model_a, model_b, **kwargs)
    store = ResumeStore(resume_dir, att, dataset, rank) if resume_dir is not None else None
    sums = None if store is not None else LabelSums(len(att.index), att.engine.device)
    records = []
    mine = plan_batches(dataset)[rank::world]
    with tqdm(total=sum(map(len, mine)), desc=f"FAIG rank {rank}" if world > 1 else "FAIG", unit="img",
              disable=not progress) as bar:
        for indices in mine:
            rec = store.load(indices) if store is not None else None
            if rec is None:
                rec = _score(att, dataset, indices, sums, keep_scores=keep_per_image or store is not None)
                if store is not None:
                    store.save(rec)
            records.append(rec)
            bar.update(len(indices))
    if sums is not None:  # one device→host transfer for the whole run
        host = checks_to_host([c for r in records for c in r.checks])
        pos = 0
        for r in records:
            r.checks, pos = host[pos:pos + len(r.checks)], pos + len(r.checks)
    result = _assemble(att, records, sums, keep_per_image)
    items = [(i, n, c) for r in records for i, n, c in zip(r.indices, r.names, r.checks)]
    if world > 1:
        result, items = _all_reduce(result, items, att, keep_per_image)
    return att.finish(result, items)


def _assemble(att: Attributor, records: list[BatchRecord], sums: LabelSums | None,
              keep_per_image: bool) -> Attribution:
    """This rank's result: counts in batch order, sums from the device or from the batches' partial sums
    added in batch order (bit-identical to the device accumulation)."""
    result = att.new_result(keep_per_image)
    for r in records:
        record_images(result, r.labels, r.names, r.scores if keep_per_image else None)
        if r.sums is not None:
            result.add_sums(r.sums)
    if sums is not None:
        result.add_sums(sums.to_host())
    return result


def _all_reduce(local: Attribution, items: list[tuple[int, str, HostCheck | None]], att: Attributor,
                keep_per_image: bool) -> tuple[Attribution, list]:
    """Sum per-label filter scores and counts over ranks; gather per-image lists in dataset order."""
    world = dist.get_world_size()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, sorted(local.sums))
    labels = sorted(set().union(*gathered))
    n = len(local.index)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    sums = torch.zeros(len(labels), n, dtype=torch.float64, device=device)
    counts = torch.zeros(len(labels), dtype=torch.float64, device=device)
    for j, l in enumerate(labels):
        if l in local.sums:
            sums[j] = local.sums[l].to(device)
            counts[j] = local.counts[l]
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    out = att.new_result(keep_per_image)
    out.sums = {l: sums[j].cpu() for j, l in enumerate(labels)}
    out.counts = {l: int(counts[j]) for j, l in enumerate(labels)}
    parts: list = [None] * world
    scores = [s.numpy() for s in local.image_scores] if keep_per_image else [None] * len(items)
    dist.all_gather_object(parts, [(i, name, label, check, s) for (i, name, check), label, s
                                   in zip(items, local.image_labels, scores)])
    merged = sorted((row for part in parts for row in part), key=lambda row: row[0])
    for _, name, label, _, s in merged:
        out.image_names.append(name)
        out.image_labels.append(label)
        if keep_per_image:
            out.image_scores.append(torch.from_numpy(s))
    return out, [(i, name, check) for i, name, _, check, _ in merged]


def finish_distributed(wait: bool = True) -> None:
    """Wait for every rank (unless this one failed), then leave the process group: a rank that
    exits while another still talks to it aborts gloo."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def init_distributed() -> tuple[int, int]:
    """Join the torchrun process group (gloo on CPU, nccl on GPU); (rank, world) or (0, 1)."""
    if "RANK" not in os.environ or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()
