"""The one FAIG run loop: ``faig_fast.attribute`` and ``faig attribute`` both run :func:`run`.

Batches come from :func:`~faig_fast.core.batches.iterate_units` (a loader's own batches, or a
dataset's size-grouped plan).  Each batch is scored into its own device sums, which are added to the
run's device sums in batch order; per-image scores reach the host only when ``keep_per_image`` asks,
and the completeness checks in one transfer at the end.

Two optional parts:

* ``resume_dir``: every finished batch is written atomically (:class:`~faig_fast.core.resume.ResumeStore`)
  with its partial sums in float64 and the digest of its inputs; a rerun recomputes only what is
  missing or was made from other inputs and adds the partial sums in batch order — the same float64
  additions, in the same order, as the device accumulation, so the sums are bit-identical.
* ``distributed``: under ``torchrun`` rank r takes batches j ≡ r (mod world); every rank must share the
  run key, sums and counts are combined with ``all_reduce`` and per-image lists gathered in dataset order.

The whole run (passes, endpoint losses, reductions) runs under one math-mode setting chosen by the
precision.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from faig_fast.core.attribution import Attribution, key_difference, run_key
from faig_fast.core.attributor import Attributor, record_images
from faig_fast.core.batches import (Unit, data_fingerprint, is_dataset, iterate_units, plan_batches, plan_digest,
                                   unit_digest)
from faig_fast.core.completeness import HostCheck, checks_to_host
from faig_fast.core.resume import BatchRecord, ResumeStore
from faig_fast.core.scoring import LabelSums
from faig_fast.errors import FAIGError


def process_group() -> tuple[int, int]:
    """(rank, world) of the initialised torch.distributed process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class _Run:
    """What one rank has done so far."""

    att: Attributor
    keep_per_image: bool
    resume_dir: str | os.PathLike | None
    fingerprint: str | None
    plan: str | None
    rank: int = 0
    store: ResumeStore | None = None
    records: list[BatchRecord] = field(default_factory=list)

    def key(self) -> dict:
        return run_key(self.att.meta, self.fingerprint, self.plan)

    def do(self, unit: Unit, sums: LabelSums | None) -> None:
        """Score ``unit`` (or reuse its stored record when resuming)."""
        rec, digest = None, None
        if self.resume_dir is not None:
            if self.store is None:  # opened once the first batch fixed the scale (part of the key)
                self.store = ResumeStore(self.resume_dir, self.key(), len(self.att.index), self.rank)
            digest = unit_digest(unit)
            rec = self.store.load(unit, digest)
        if rec is None:
            rec = _score(self.att, unit, sums, keep_scores=self.keep_per_image or self.store is not None)
            if self.store is not None:
                rec.digest = digest
                self.store.save(unit, rec)
        self.records.append(rec)


def run(att: Attributor, data: Iterable, *, keep_per_image: bool = False, progress: bool = False,
        resume_dir: str | os.PathLike | None = None, distributed: bool = False) -> Attribution:
    """FAIG of ``att``'s pair over a loader or dataset (see :func:`faig_fast.attribute`)."""
    rank, world = process_group() if distributed else (0, 1)
    plan = plan_batches(data) if is_dataset(data) else None
    state = _Run(att, keep_per_image, resume_dir, data_fingerprint(data), plan_digest(plan), rank)
    sums = None if resume_dir is not None else att.new_sums()
    total = sum(map(len, plan[rank::world])) if plan is not None else None
    with att.math_mode(), tqdm(total=total, desc=f"FAIG rank {rank}" if world > 1 else "FAIG", unit="img",
                               disable=not progress) as bar:
        for unit in iterate_units(data, att.validate, wanted=lambda j: j % world == rank, plan=plan):
            if unit.parts is not None:
                state.do(unit, sums)
                bar.update(len(unit.positions))
        records = state.records
        if sums is not None:  # one device→host transfer for the whole run
            host = checks_to_host([c for r in records for c in r.checks])
            pos = 0
            for r in records:
                r.checks, pos = host[pos:pos + len(r.checks)], pos + len(r.checks)
        result = _assemble(att, records, sums, keep_per_image)
        items = [(i, n, c) for r in records for i, n, c in zip(r.positions, r.names, r.checks)]
        key = state.key()
        if world > 1:
            key = _shared_key(key, bool(records))
            result, items = _all_reduce(result, items, att, keep_per_image)
        result = att.finish(result, items)
    result.meta["run_key"] = key
    return result


def _score(att: Attributor, unit: Unit, sums: LabelSums | None, keep_scores: bool) -> BatchRecord:
    """Score one unit into its own device sums; those are added to the run's ``sums`` on the device, or
    (``sums`` None, when resuming) returned on the host.  Either way the run's totals are
    ((0 + batch₁) + batch₂) + …, so a resumed run adds exactly what an uninterrupted one does."""
    own = att.new_sums()
    parts = [att.score_batch(batch, own, positions) for positions, batch in unit.parts]
    checks = [c for p in parts for c in p.checks]
    rec = BatchRecord(list(unit.positions), [l for p in parts for l in p.labels], [n for p in parts for n in p.names],
                      checks, scores=torch.cat([p.scores for p in parts]).cpu() if keep_scores else None)
    if sums is not None:
        sums.add(own)
    else:
        rec.checks, rec.sums = checks_to_host(checks), own.to_host()
    return rec


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


def _shared_key(key: dict, has_images: bool) -> dict:
    """The run key all ranks that computed something share; a clear error when any two differ (other
    models, settings, images or scale on one rank would make the reduced sums meaningless)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (key, has_images))
    keys = [(r, k) for r, (k, has) in enumerate(gathered) if has]
    for r, k in keys[1:]:
        diff = key_difference(keys[0][1], k)
        if diff is not None:
            raise FAIGError(f"torchrun ranks {keys[0][0]} and {r} attribute different runs ({diff}); every rank "
                            "must load the same models, settings and images")
    return keys[0][1] if keys else key


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
