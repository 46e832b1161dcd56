"""``faig_fast.attribute``: the entry point other research code calls."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from faig_fast.attribution import Attribution
from faig_fast.batches import iterate_batches, model_scale
from faig_fast.engine import PathEngine
from faig_fast.filters import model_hash
from faig_fast.quadrature import nodes_and_weights
from faig_fast.reduction import filter_abs_sum
import faig_fast


def attribute(model_a: nn.Module, model_b: nn.Module, loader: Iterable, *, steps: int = 100,
              method: str = "riemann_left", device: torch.device | str | None = None, strategy: str = "auto",
              precision: str = "fp32", internal_batch_size: int | None = None, memory_budget: int | None = None,
              backend: str = "auto", keep_per_image: bool = False, return_convergence_delta: bool = False,
              progress: bool = False) -> Attribution:
    """FAIG of every conv filter between baseline ``model_a`` (θ̄) and target ``model_b`` (θ).

    ``loader`` yields ``(lq, gt, label)`` tuples or dicts (tensors CHW or BCHW in [0, 1]; ``label``
    a string or one string per sample).  ``steps`` and ``method`` choose the quadrature of Eq. 5
    (``riemann_left`` with 100 steps is the paper's Eq. 6).  ``internal_batch_size`` caps how many
    steps run in one batched pass (default: planned from free memory / ``memory_budget`` bytes).
    ``return_convergence_delta`` records, per image, |Σ_i FAIG_i − (L(θ̄) − L(θ))| / |L(θ̄) − L(θ)|
    over all parameters (Eq. 4) in ``Attribution.convergence_delta``.
    """
    nodes_and_weights(method, steps)
    engine = PathEngine(model_a, model_b, device=device, strategy=strategy, precision=precision,
                        chunk_size=internal_batch_size, memory_budget=memory_budget)
    meta = {
        "steps": steps, "method": method, "rule": f"{method}/{steps}", "strategy": engine.strategy,
        "precision": precision, "device": str(engine.device), "version": faig_fast.__version__,
        "model_a_sha256": model_hash(model_a), "model_b_sha256": model_hash(model_b),
        "architecture": type(model_b).__name__,
    }
    result = Attribution(engine.index, meta, keep_per_image)
    scorer = FilterScorer(engine, backend)
    bar = tqdm(desc="FAIG", unit="img", disable=not progress)
    for batch in iterate_batches(loader, model_scale(model_b)):
        for start in range(0, len(batch), max(1, internal_batch_size or len(batch))):
            sl = slice(start, start + (internal_batch_size or len(batch)))
            images = engine.integrate(batch.lq[sl], batch.gt[sl], method, steps, endpoints=return_convergence_delta)
            scores = scorer(images)
            for j, img in enumerate(images):
                k = start + j
                delta = convergence_delta(engine, img) if return_convergence_delta else None
                result.add(batch.labels[k], scores[j], batch.names[k], delta)
            bar.update(len(images))
    bar.close()
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

    def __call__(self, images: list) -> torch.Tensor:
        n = len(self.engine.index)
        out = torch.empty(len(images), n, dtype=torch.float64)
        for kk, layers in self.groups.items():
            grads = torch.stack([torch.cat([img.grads[l.name].reshape(-1) for l in layers]) for img in images])
            s = filter_abs_sum(self.deltas[kk], grads, kk, backend=self.backend).to("cpu", torch.float64)
            pos = 0
            for l in layers:
                out[:, l.start:l.start + l.num_filters] = s[:, pos:pos + l.num_filters]
                pos += l.num_filters
        return out


def convergence_delta(engine: PathEngine, img) -> float:
    """Relative completeness error of Eq. 4 for one image, over every parameter (signed)."""
    total = sum(float((engine.delta[n].double() * img.grads[n].double()).sum()) for n in engine.param_names)
    diff = img.loss_baseline - img.loss_target
    return abs(total - diff) / max(abs(diff), 1e-12)
