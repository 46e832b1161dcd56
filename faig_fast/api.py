"""``faig_fast.attribute``: the entry point other research code calls."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

import faig_fast
from faig_fast.attribution import Attribution
from faig_fast.batches import Batch, iterate_batches, model_scale
from faig_fast.engine import ImageResult, PathEngine
from faig_fast.filters import model_hash
from faig_fast.quadrature import nodes_and_weights
from faig_fast.reduction import filter_abs_sum


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

    def score_batch(self, batch: Batch) -> Iterator[ImageScore]:
        """Per-image scores of one validated batch, in order."""
        n = len(batch)
        chunk = max(1, self.internal_batch_size or n)
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            images = self.engine.integrate(batch.lq[sl], batch.gt[sl], self.method, self.steps,
                                           endpoints=self.with_delta)
            scores = self.scorer(images)
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
    with tqdm(desc="FAIG", unit="img", disable=not progress) as bar:
        for batch in iterate_batches(loader, att.scale):
            for s in att.score_batch(batch):
                result.add(s.label, s.scores, s.name, s.delta)
                bar.update(1)
    result.meta.update(att.meta)
    return result


class FilterScorer:
    """Per-filter Σ_kk |Δ ⊙ ḡ| for all conv layers, one reduction launch per kernel area."""

    def __init__(self, engine: PathEngine, backend: str = "auto"):
        self.engine = engine
        self.backend = backend
        self.groups: dict[int, list] = {}
        for layer in engine.index.layers:
            self.groups.setdefault(layer.kk, []).append(layer)
        self.deltas = {kk: torch.cat([engine.delta[l.name].reshape(-1) for l in ls])
                       for kk, ls in self.groups.items()}

    def __call__(self, images: list[ImageResult]) -> torch.Tensor:
        out = torch.empty(len(images), len(self.engine.index), dtype=torch.float64)
        for kk, layers in self.groups.items():
            grads = torch.stack([torch.cat([img.grads[l.name].reshape(-1) for l in layers]) for img in images])
            s = filter_abs_sum(self.deltas[kk], grads, kk, backend=self.backend).to("cpu", torch.float64)
            pos = 0
            for l in layers:
                out[:, l.start:l.start + l.num_filters] = s[:, pos:pos + l.num_filters]
                pos += l.num_filters
        return out


def convergence_delta(engine: PathEngine, img: ImageResult) -> float:
    """Relative completeness error of Eq. 4 for one image, over every parameter (signed)."""
    total = sum(float((engine.delta[n].double() * img.grads[n].double()).sum()) for n in engine.param_names)
    diff = img.loss_baseline - img.loss_target
    return abs(total - diff) / max(abs(diff), 1e-12)
