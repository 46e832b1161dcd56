"""``faig_fast.attribute``: the entry point other research code calls, and the one batch loop that
``faig attribute`` (:func:`faig_fast.apps.runs.attribute_dataset`) shares with it.

:class:`Attributor` validates batches (inferring the model's scale from one forward pass when it
declares none), integrates them through :class:`~faig_fast.core.engine.PathEngine`, reduces the
gradients to per-filter scores that are summed per degradation on the device
(:class:`LabelSums`), and checks the completeness of Eq. 4 on a sample of images
(:class:`CompletenessGuard`): a path integral that does not add up to the loss change is a silent
wrong answer, so it warns.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

import faig_fast
from faig_fast.core.attribution import Attribution
from faig_fast.core.batches import Batch, check_sizes, infer_scale, model_scale, normalize_batch
from faig_fast.core.engine import ImageResult, PathEngine
from faig_fast.core.filters import FilterIndex
from faig_fast.core.pair import model_hash
from faig_fast.core.quadrature import nodes_and_weights
from faig_fast.core.completeness import Check, CompletenessGuard, HostCheck, checks_to_host, relative_delta
from faig_fast.errors import InvalidInputError
from faig_fast.ops.reduction import filter_abs_sum, filter_abs_sum_accumulate

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
    """A model pair prepared for FAIG: the engine, the filter index and reduction, batch validation,
    the completeness guard and provenance."""

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
        # floating buffers that differ move along the path without a gradient: Eq. 4 over parameters fails
        moved = self.engine.moved_buffers
        skip = (f"floating buffers differ between the models ({', '.join(moved[:3])}): they move along the path "
                "without a gradient, so Eq. 4 over parameters cannot hold") if moved else None
        self.guard = CompletenessGuard(method, steps, precision, check_completeness, return_convergence_delta, skip)
        self.meta = {
            "steps": steps, "method": method, "rule": f"{method}/{steps}", "strategy": self.engine.strategy,
            "precision": precision, "device": str(self.engine.device), "version": faig_fast.__version__,
            "model_a_sha256": model_hash(model_a), "model_b_sha256": model_hash(model_b),
            "architecture": type(model_b).__name__, "filters": filters, "mode": mode, "scale": self.scale,
        }

    def new_result(self, keep_per_image: bool = False) -> Attribution:
        return Attribution(self.index, self.meta, keep_per_image)

    # validation ---------------------------------------------------------------------------------
    def batches(self, loader: Iterable) -> Iterator[tuple[int, Batch]]:
        """Validated batches of ``loader`` with the position of their first image; raises if empty."""
        if loader is None:
            raise InvalidInputError("loader is None: pass an iterable of (lq, gt, label) batches")
        count = 0
        for i, raw in enumerate(loader):
            b = self.validate(normalize_batch(raw, i, self.scale, count), f"batch {i}")
            yield count, b
            count += len(b)
        if count == 0:
            raise InvalidInputError("the loader yielded no images: nothing to attribute")

    def validate(self, batch: Batch, where: str) -> Batch:
        """Check a batch against the model: the first one by a forward pass (inferring the scale when the
        model declares none; output channels and size must equal gt's), later ones by channel counts."""
        channels = (batch.lq.shape[1], batch.gt.shape[1])
        if self.channels is None:
            out_shape = self._probe(batch, where)
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

    def _probe(self, batch: Batch, where: str) -> tuple[int, ...]:
        """Output shape (C, H, W) of the target model on the batch's first image."""
        x = batch.lq[:1].to(self.engine.device, self.engine.dtype)  # engine.forward passes a copy
        try:
            with torch.no_grad():
                out = self.engine.forward(0.0, x)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise InvalidInputError(
                f"{where}: the model cannot run on lq of shape {tuple(batch.lq.shape[1:])}: {e}") from e
        return tuple(out.shape[1:])

    # scoring ------------------------------------------------------------------------------------
    def score_batch(self, batch: Batch, sums: "LabelSums | None", positions: Sequence[int]) -> BatchScores:
        """Per-image scores of one validated batch; with ``sums``, also added to it on the device.

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
                checks.append(self.check(img, batch.lq[k:k + 1], batch.gt[k:k + 1])
                              if self.guard.wants(positions[k]) else None)
        return BatchScores(list(batch.labels), list(batch.names), list(positions), torch.cat(parts), checks)

    def check(self, img: ImageResult, lq: torch.Tensor, gt: torch.Tensor) -> Check:
        """Σ_i FAIG_i over every parameter and the endpoint losses for one image, on the device."""
        e = self.engine
        total = torch.zeros((), dtype=torch.float64, device=e.device)
        for n in e.param_names:
            g = img.grads.get(n)
            if g is not None:
                total = total + (e.delta[n].double() * g.double()).sum()
        return Check(total, *e.endpoint_losses(lq, gt))

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


def record_batch(result: Attribution, bs: BatchScores, keep_per_image: bool) -> None:
    """Count a batch's images in ``result``, copying their scores to the host if kept."""
    record_images(result, bs.labels, bs.names, bs.scores.cpu() if keep_per_image else None)


def attribute(model_a: nn.Module, model_b: nn.Module, loader: Iterable, *, steps: int = 100,
              method: str = "riemann_left", device: torch.device | str | None = None, strategy: str = "auto",
              precision: str = "fp32", internal_batch_size: int | None = None, memory_budget: int | None = None,
              backend: str = "auto", keep_per_image: bool = False, return_convergence_delta: bool = False,
              progress: bool = False, filters: str = "conv", mode: str = "eval",
              check_completeness: bool = True) -> Attribution:
    """FAIG of every filter between baseline ``model_a`` (θ̄) and target ``model_b`` (θ).

    ``loader`` yields ``(lq, gt, label[, name])`` tuples or dicts (tensors CHW or BCHW in [0, 1], any
    channel count; ``label`` a string or one string per sample).  The model's scale is its ``upscale``
    or ``scale`` attribute, else inferred from one forward pass (1 for denoisers).  ``steps`` and
    ``method`` choose the quadrature of Eq. 5 (``riemann_left`` with 100 steps is the paper's Eq. 6).
    ``strategy`` picks the engine (``loop``, ``vmap``, ``linear``, ``persample``, ``tune``; ``auto`` is
    ``loop`` on CPU and ``tune`` on GPU),
    ``precision`` one of ``fp32``, ``tf32``, ``bf16``, ``fp64``.  ``internal_batch_size`` caps the
    steps (and images, for ``vmap``) run in one batched pass; by default chunks are planned from free
    memory or ``memory_budget`` bytes.  ``filters`` is ``"conv"`` (the paper's K×K conv slices) or
    ``"conv+linear"``; ``mode`` (``"eval"``, ``"train"``, ``"as-is"``) the module mode of the passes.
    ``return_convergence_delta`` records, per image, |Σ_i FAIG_i − (L(θ̄) − L(θ))| / |L(θ̄) − L(θ)|
    over all parameters (Eq. 4).  ``check_completeness`` computes it on a sample of images (≤ 5 %
    extra cost; ``meta["completeness"]``) and warns with :class:`~faig_fast.errors.CompletenessWarning`
    when it exceeds what the quadrature rule explains.
    """
    att = Attributor(model_a, model_b, steps=steps, method=method, device=device, strategy=strategy,
                     precision=precision, internal_batch_size=internal_batch_size, memory_budget=memory_budget,
                     backend=backend, return_convergence_delta=return_convergence_delta, filters=filters,
                     mode=mode, check_completeness=check_completeness)
    result = att.new_result(keep_per_image)
    sums = LabelSums(len(att.index), att.engine.device)
    positions, names, checks = [], [], []
    with tqdm(desc="FAIG", unit="img", disable=not progress) as bar:
        for pos, batch in att.batches(loader):
            bs = att.score_batch(batch, sums, range(pos, pos + len(batch)))
            record_batch(result, bs, keep_per_image)
            positions += bs.positions
            names += bs.names
            checks += bs.checks
            bar.update(len(batch))
    result.add_sums(sums.to_host())
    return att.finish(result, list(zip(positions, names, checks_to_host(checks))))


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

    def add(self, other: "LabelSums") -> None:
        """Add another run's sums row by row, on the device (float64, so the same as on the host)."""
        if other.rows:
            rows = self.label_index(list(other.rows))  # may grow self.totals: index it afterwards
            self.totals[rows] += other.totals

    def to_host(self) -> dict[str, torch.Tensor]:
        host = self.totals.cpu()
        return {l: host[i] for l, i in self.rows.items()}


class FilterScorer:
    """Per-filter Σ_kk |Δ ⊙ ḡ| for every layer of ``index``, one reduction launch per kernel area.

    With ``sums`` the launch also adds each image's scores to its degradation's row (the fused
    reduce-and-accumulate kernel, into a per-batch buffer in the gradients' dtype that is then added
    to the float64 totals), so nothing leaves the device per image.
    """

    def __init__(self, engine: PathEngine, backend: str = "auto", index: FilterIndex | None = None):
        self.engine = engine
        self.backend = backend
        self.index = engine.index if index is None else index
        self.groups: dict[int, list] = {}
        for layer in self.index.layers:
            self.groups.setdefault(layer.kk, []).append(layer)
        self.deltas = {kk: torch.cat([engine.delta[l.name].reshape(-1) for l in ls])
                       for kk, ls in self.groups.items()}

    def __call__(self, images: list[ImageResult], labels: list[str] | None = None,
                 sums: LabelSums | None = None) -> torch.Tensor:
        """(B, F) float64 scores on the engine's device; with ``labels`` and ``sums``, also accumulated."""
        device = self.engine.device
        out = torch.empty(len(images), len(self.index), dtype=torch.float64, device=device)
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

