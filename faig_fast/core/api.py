"""``faig_fast.attribute``: the entry point other research code calls."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

import faig_fast
from faig_fast.core.attribution import Attribution
from faig_fast.core.batches import Batch, iterate_batches, model_scale
from faig_fast.core.engine import ImageResult, PathEngine
from faig_fast.core.pair import model_hash
from faig_fast.core.quadrature import nodes_and_weights
from faig_fast.ops.reduction import filter_abs_sum, filter_abs_sum_accumulate


@dataclass
class ImageScore:
    """One image's per-filter scores Σ_kk |FAIG_i| and, when asked, its convergence delta."""

    label: str
    name: str
    scores: torch.Tensor
    delta: float | None = None


class Attributor:
    """A model pair prepared for FAIG: the engine, the per-filter reduction and provenance."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, *, steps: int = 100, method: str = "riemann_left",
                 device: torch.device | str | None = None, strategy: str = "auto", precision: str = "fp32",
                 internal_batch_size: int | None = None, memory_budget: int | None = None, backend: str = "auto",
                 return_convergence_delta: bool = False):
        nodes_and_weights(method, steps)
        self.engine = PathEngine(model_a, model_b, device=device, strategy=strategy, precision=precision,
                                 chunk_size=internal_batch_size, memory_budget=memory_budget)
        self.steps, self.method = steps, method
        self.internal_batch_size = internal_batch_size
        self.with_delta = return_convergence_delta
        self.scorer = FilterScorer(self.engine, backend)
        self.scale = model_scale(model_b)
        self.meta = {
            "steps": steps, "method": method, "rule": f"{method}/{steps}", "strategy": self.engine.strategy,
            "precision": precision, "device": str(self.engine.device), "version": faig_fast.__version__,
            "model_a_sha256": model_hash(model_a), "model_b_sha256": model_hash(model_b),
            "architecture": type(model_b).__name__,
        }

    def new_result(self, keep_per_image: bool = False) -> Attribution:
        return Attribution(self.engine.index, self.meta, keep_per_image)

    def score_batch(self, batch: Batch, sums: "LabelSums | None" = None) -> Iterator[ImageScore]:
        """Per-image scores of one validated batch, in order; with ``sums``, also added to it on the device."""
        n = len(batch)
        chunk = max(1, self.internal_batch_size or n)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            images = self.engine.integrate(batch.lq[sl], batch.gt[sl], self.method, self.steps,
                                           endpoints=self.with_delta)
            scores = self.scorer(images, batch.labels[sl], sums)
            self.meta["strategy"] = self.engine.strategy
            for j, img in enumerate(images):
                k = start + j
                delta = convergence_delta(self.engine, img) if self.with_delta else None
                yield ImageScore(batch.labels[k], batch.names[k], scores[j], delta)


def attribute(model_a: nn.Module, model_b: nn.Module, loader: Iterable, *, steps: int = 100,
              method: str = "riemann_left", device: torch.device | str | None = None, strategy: str = "auto",
              precision: str = "fp32", internal_batch_size: int | None = None, memory_budget: int | None = None,
              backend: str = "auto", keep_per_image: bool = False, return_convergence_delta: bool = False,
              progress: bool = False) -> Attribution:
    """FAIG of every conv filter between baseline ``model_a`` (θ̄) and target ``model_b`` (θ).

    ``loader`` yields ``(lq, gt, label)`` tuples or dicts (tensors CHW or BCHW in [0, 1]; ``label``
    a string or one string per sample).  ``steps`` and ``method`` choose the quadrature of Eq. 5
    (``riemann_left`` with 100 steps is the paper's Eq. 6).  ``strategy`` picks the engine
    (``loop``, ``vmap``, ``linear``; ``auto`` = fastest for the device), ``precision`` one of
    ``fp32``, ``tf32``, ``bf16``, ``fp64``.  ``internal_batch_size`` caps the steps (and images,
    for ``vmap``) run in one batched pass; by default chunks are planned from free memory or
    ``memory_budget`` bytes.  ``return_convergence_delta`` records, per image,
    |Σ_i FAIG_i − (L(θ̄) − L(θ))| / |L(θ̄) − L(θ)| over all parameters (Eq. 4).
    """
    att = Attributor(model_a, model_b, steps=steps, method=method, device=device, strategy=strategy,
                     precision=precision, internal_batch_size=internal_batch_size, memory_budget=memory_budget,
                     backend=backend, return_convergence_delta=return_convergence_delta)
    result = att.new_result(keep_per_image)
    sums = None if keep_per_image else LabelSums(len(att.engine.index), att.engine.device)
    with tqdm(desc="FAIG", unit="img", disable=not progress) as bar:
        for batch in iterate_batches(loader, att.scale):
            for s in att.score_batch(batch, sums):
                if sums is None:
                    result.add(s.label, s.scores, s.name, s.delta)
                else:
                    result.record(s.label, s.name, s.delta)
                bar.update(1)
    if sums is not None:
        result.add_sums(sums.to_host())
    result.meta.update(att.meta)
    return result


class LabelSums:
    """Per-degradation sums of per-filter scores, kept on the device in float64 until the run ends."""

    def __init__(self, num_filters: int, device: torch.device):
        self.rows: dict[str, int] = {}
        self.totals = torch.zeros(0, num_filters, dtype=torch.float64, device=device)

    def label_index(self, labels: list[str]) -> torch.Tensor:
        """Row of each label (new labels get a zero row), as int64 on the device."""
        new = [l for l in dict.fromkeys(labels) if l not in self.rows]
        if new:
            for l in new:
                self.rows[l] = len(self.rows)
            pad = self.totals.new_zeros(len(new), self.totals.shape[1])
            self.totals = torch.cat([self.totals, pad])
        return torch.tensor([self.rows[l] for l in labels], dtype=torch.int64, device=self.totals.device)

    def to_host(self) -> dict[str, torch.Tensor]:
        host = self.totals.cpu()
        return {l: host[i] for l, i in self.rows.items()}


class FilterScorer:
    """Per-filter Σ_kk |Δ ⊙ ḡ| for all conv layers, one reduction launch per kernel area.

    With ``sums`` the launch also adds each image's scores to its degradation's row (the fused
    reduce-and-accumulate kernel, into a per-batch buffer in the gradients' dtype that is then added
    to the float64 totals), so nothing leaves the device per image.
    """

    def __init__(self, engine: PathEngine, backend: str = "auto"):
        self.engine = engine
        self.backend = backend
        self.groups: dict[int, list] = {}
        for layer in engine.index.layers:
            self.groups.setdefault(layer.kk, []).append(layer)
        self.deltas = {kk: torch.cat([engine.delta[l.name].reshape(-1) for l in ls])
                       for kk, ls in self.groups.items()}

    def __call__(self, images: list[ImageResult], labels: list[str] | None = None,
                 sums: LabelSums | None = None) -> torch.Tensor:
        """(B, F) float64 scores on the engine's device; with ``labels`` and ``sums``, also accumulated."""
        device = self.engine.device
        out = torch.empty(len(images), len(self.engine.index), dtype=torch.float64, device=device)
        idx = sums.label_index(list(labels)) if sums is not None else None
        for kk, layers in self.groups.items():
            grads = torch.stack([torch.cat([img.grads[l.name].reshape(-1) for l in layers]) for img in images])
            delta = self.deltas[kk]
            if idx is None:
                s = filter_abs_sum(delta, grads, kk, backend=self.backend)
                part = None
            else:
                part = grads.new_zeros(sums.totals.shape[0], delta.numel() // kk)
                s = filter_abs_sum_accumulate(delta, grads, kk, idx, part, backend=self.backend)
            pos = 0
            for l in layers:
                dst = slice(l.start, l.start + l.num_filters)
                src = slice(pos, pos + l.num_filters)
                out[:, dst] = s[:, src]
                if part is not None:
                    sums.totals[:, dst] += part[:, src]
                pos += l.num_filters
        return out


def convergence_delta(engine: PathEngine, img: ImageResult) -> float:
    """Relative completeness error of Eq. 4 for one image, over every parameter (signed)."""
    total = sum(float((engine.delta[n].double() * img.grads[n].double()).sum()) for n in engine.param_names)
    diff = img.loss_baseline - img.loss_target
    return abs(total - diff) / max(abs(diff), 1e-12)
