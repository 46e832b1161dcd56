"""A model pair prepared for FAIG: the engine, the filter index and reduction, batch validation, the
completeness guard and provenance.  The run loop (:mod:`faig_fast.core.run_loop`) drives it.

:class:`Attributor` validates batches (inferring the model's scale from one forward pass when it
declares none), integrates them through :class:`~faig_fast.core.engine.PathEngine`, reduces the
gradients to per-filter scores summed per degradation on the device
(:class:`~faig_fast.core.scoring.LabelSums`), and checks the completeness of Eq. 4 on a sample of
images (:class:`~faig_fast.core.completeness.CompletenessGuard`): a path integral that does not add
up to the loss change is a silent wrong answer, so it warns.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

import faig_fast
from faig_fast.core.attribution import RUN_FORMAT, Attribution
from faig_fast.core.batches import Batch, check_sizes, infer_scale, model_scale, probe_output
from faig_fast.core import completeness
from faig_fast.core.completeness import Check, HostCheck, relative_delta
from faig_fast.core.engine import PathEngine
from faig_fast.core.filters import FilterIndex
from faig_fast.core.pair import model_hash
from faig_fast.core.quadrature import nodes_and_weights
from faig_fast.core.scoring import FilterScorer, LabelSums
from faig_fast.errors import InvalidInputError


@dataclass
class BatchScores:
    """Per-image scores of one batch (``scores`` (B, F) float64 on the engine's device) with the
    dataset positions of its images and the completeness checks of the sampled ones."""

    labels: list[str]
    names: list[str]
    positions: list[int]
    scores: torch.Tensor
    checks: list[Check | None]


class Attributor:
    """A model pair prepared for FAIG (see the module docstring); ``meta`` is the run's provenance."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, *, steps: int = 100, method: str = "riemann_left",
                 device: torch.device | str | None = None, strategy: str = "auto", precision: str = "fp32",
                 internal_batch_size: int | None = None, memory_budget: int | None = None, backend: str = "auto",
                 return_convergence_delta: bool = False, filters: str = "conv", mode: str = "eval",
                 check_completeness: bool = True):
        nodes_and_weights(method, steps)
        self.engine = PathEngine(model_a, model_b, device=device, strategy=strategy, precision=precision,
                                 chunk_size=internal_batch_size, memory_budget=memory_budget, mode=mode)
        self.index = FilterIndex.from_model(model_b, filters=filters)
        self.steps, self.method = steps, method
        self.internal_batch_size = internal_batch_size
        self.with_delta = return_convergence_delta
        self.scorer = FilterScorer(self.engine, backend, self.index)
        self.scale = model_scale(model_b)
        self.channels: tuple[int, int] | None = None  # (lq, gt) channels, fixed by the first batch
        self.guard = completeness.CompletenessGuard(method, steps, precision, check_completeness,
                                                    return_convergence_delta, self.engine.buffers_move)
        self.meta = {
            "steps": steps, "method": method, "rule": f"{method}/{steps}", "strategy": self.engine.strategy,
            "precision": precision, "device": str(self.engine.device), "version": faig_fast.__version__,
            "model_a_sha256": model_hash(model_a), "model_b_sha256": model_hash(model_b),
            "architecture": type(model_b).__name__, "filters": filters, "mode": mode, "scale": self.scale,
            "run_format": RUN_FORMAT,
        }

    def new_result(self, keep_per_image: bool = False) -> Attribution:
        return Attribution(self.index, self.meta, keep_per_image)

    def new_sums(self) -> LabelSums:
        return LabelSums(len(self.index), self.engine.device)

    def math_mode(self) -> contextlib.AbstractContextManager:
        """The one matmul/convolution precision setting of the whole run (TF32 off for fp32 on CUDA)."""
        return self.engine.runner.math_mode()

    # validation ---------------------------------------------------------------------------------
    def validate(self, batch: Batch, where: str) -> Batch:
        """Check a batch against the model: sizes against its scale; the first batch by a forward pass
        (inferring the scale when the model declares none; output channels and size must equal gt's),
        later ones by channel counts."""
        check_sizes(batch.lq, batch.gt, self.scale, where)
        channels = (batch.lq.shape[1], batch.gt.shape[1])
        if self.channels is None:
            x = batch.lq[:1].to(self.engine.device, self.engine.dtype)  # engine.forward passes a copy
            out_shape = probe_output(lambda t: self.engine.forward(0.0, t), x, where)
            if self.scale is None:
                self.scale = infer_scale(tuple(batch.lq.shape[-2:]), out_shape[-2:], where)
                self.meta["scale"] = self.scale
                check_sizes(batch.lq, batch.gt, self.scale, where)
            if tuple(out_shape) != tuple(batch.gt.shape[1:]):
                raise InvalidInputError(
                    f"{where}: the model maps lq of shape {tuple(batch.lq.shape[1:])} to an output of shape "
                    f"{tuple(out_shape)} (channels, height, width) but gt has shape {tuple(batch.gt.shape[1:])}")
            self.channels = channels
        elif channels != self.channels:
            raise InvalidInputError(
                f"{where}: lq/gt have {channels[0]}/{channels[1]} channels but the first batch had "
                f"{self.channels[0]}/{self.channels[1]}")
        return batch

    # scoring ------------------------------------------------------------------------------------
    def score_batch(self, batch: Batch, sums: LabelSums, positions: Sequence[int]) -> BatchScores:
        """Per-image scores of one validated batch, also added to ``sums`` on the device.

        ``positions`` (dataset positions of the images) choose which images the completeness guard checks.
        """
        n = len(batch)
        chunk = max(1, self.internal_batch_size or n)
        parts, checks = [], []
        for start in range(0, n, chunk):
            sl = slice(start, start + chunk)
            images = self.engine.integrate(batch.lq[sl], batch.gt[sl], self.method, self.steps)
            parts.append(self.scorer(images, batch.labels[sl], sums))
            self.meta["strategy"] = self.engine.strategy
            for j, img in enumerate(images):
                k = start + j
                checks.append(completeness.image_check(self.engine, img, batch.lq[k:k + 1], batch.gt[k:k + 1],
                                                      self.method, self.steps)
                              if self.guard.wants(positions[k]) else None)
        return BatchScores(list(batch.labels), list(batch.names), list(positions), torch.cat(parts), checks)

    def finish(self, result: Attribution, items: Sequence[tuple[int, str, HostCheck | None]]) -> Attribution:
        """Provenance, convergence deltas (when asked) and the completeness report into ``result``.

        ``items``: (position, name, check) of every image, in dataset order.
        """
        if self.with_delta:
            result.convergence_delta = [relative_delta(c) for _, _, c in items]
        result.meta.update(self.meta)
        result.meta["completeness"] = self.guard.report(items)
        return result


def record_images(result: Attribution, labels: Sequence[str], names: Sequence[str],
                  host_scores: torch.Tensor | None) -> None:
    """Count images in ``result`` (their sums reach it separately), keeping their host scores if given."""
    for j, (label, name) in enumerate(zip(labels, names)):
        result.record(label, name)
        if host_scores is not None:
            result.image_scores.append(host_scores[j])
