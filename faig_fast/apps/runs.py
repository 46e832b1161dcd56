"""Long FAIG runs over a dataset: resumable per-image results and torch.distributed sharding.

Each finished image's scores are written atomically (temp file, then rename) to ``resume_dir``;
a restarted run loads them and computes only what is missing.  The final result is always
assembled in dataset order, so a run that was killed and resumed gives bit-identical sums.
Under ``torchrun`` every rank takes images ``i ≡ rank (mod world)``; per-filter sums and counts
are combined with ``all_reduce`` and rank 0 keeps the result.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from faig_fast.core.api import Attributor, ImageScore
from faig_fast.core.attribution import Attribution
from faig_fast.utils.io import atomic_save_safetensors, atomic_write_json
from faig_fast.core.batches import normalize_batch
from faig_fast.errors import InvalidInputError


def _item_path(resume_dir: Path, i: int) -> Path:
    return resume_dir / f"item{i:06d}.safetensors"


def _load_item(path: Path) -> ImageScore | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            scores = f.get_tensor("scores")
    except Exception:
        return None  # a torn or foreign file is recomputed, never trusted
    delta = json.loads(meta["delta"])
    return ImageScore(meta["label"], meta["name"], scores, delta)


def _save_item(path: Path, s: ImageScore) -> None:
    atomic_save_safetensors({"scores": s.scores.contiguous()},
                            {"label": s.label, "name": s.name, "delta": json.dumps(s.delta)}, path)


def attribute_dataset(model_a: nn.Module, model_b: nn.Module, dataset: Sequence, *, resume_dir: str | Path | None = None,
                      keep_per_image: bool = False, progress: bool = False, **kwargs) -> Attribution:
    """FAIG over an indexable dataset of ``(lq, gt, label)`` items, resumable and shardable.

    ``kwargs`` go to :class:`faig_fast.core.api.Attributor` (steps, method, strategy, precision, ...).
    """
    if len(dataset) == 0:
        raise InvalidInputError("the dataset is empty: nothing to attribute")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    att = Attributor(model_a, model_b, **kwargs)
    rdir = Path(resume_dir) if resume_dir is not None else None
    if rdir is not None:
        rdir.mkdir(parents=True, exist_ok=True)
        manifest = rdir / "run.json"
        key = {k: att.meta[k] for k in ("rule", "precision", "model_a_sha256", "model_b_sha256")}
        key["items"] = len(dataset)
        if manifest.exists() and json.loads(manifest.read_text()) != key:
            raise InvalidInputError(f"{rdir} holds a run with other settings or models; use a fresh --resume-dir")
        if rank == 0:
            atomic_write_json(manifest, key)
    mine = range(rank, len(dataset), world)
    done: dict[int, ImageScore] = {}
    for i in tqdm(mine, desc=f"FAIG rank {rank}" if world > 1 else "FAIG", unit="img", disable=not progress):
        cached = _load_item(_item_path(rdir, i)) if rdir is not None and _item_path(rdir, i).exists() else None
        if cached is None:
            lq, gt, label = dataset[i][:3]
            name = dataset.item_name(i) if hasattr(dataset, "item_name") else f"item{i}"
            batch = normalize_batch((lq, gt, label, name), i, att.scale, i)
            cached = next(att.score_batch(batch))
            if rdir is not None:
                _save_item(_item_path(rdir, i), cached)
        done[i] = cached
    result = att.new_result(keep_per_image)
    for i in mine:
        s = done[i]
        result.add(s.label, s.scores, s.name, s.delta)
    if world > 1:
        result = _all_reduce(result, att, keep_per_image)
    result.meta.update(att.meta)
    return result


def _all_reduce(local: Attribution, att: Attributor, keep_per_image: bool) -> Attribution:
    """Sum per-label filter scores and counts over ranks (labels agreed through all_gather_object)."""
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
    dist.all_gather_object(parts, (local.image_names, local.image_labels, local.convergence_delta,
                                   [s.numpy() for s in local.image_scores]))
    for names, labs, deltas, scores in parts:
        out.image_names += names
        out.image_labels += labs
        out.convergence_delta += deltas
        out.image_scores += [torch.from_numpy(s) for s in scores]
    return out


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
