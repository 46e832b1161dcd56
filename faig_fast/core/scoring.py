"""Per-filter scores on the device: the fused reduce-and-accumulate of Σ_kk |Δ ⊙ ḡ| per filter
(:class:`FilterScorer`) and per-degradation float64 sums that stay on the device until the run ends
(:class:`LabelSums`)."""
from __future__ import annotations

import torch

from faig_fast.core.engine import ImageResult, PathEngine
from faig_fast.core.filters import FilterIndex
from faig_fast.ops.reduction import filter_abs_sum, filter_abs_sum_accumulate


class LabelSums:
    """Per-degradation sums of per-filter scores, kept on the device in float64 until the run ends."""

    def __init__(self, num_filters: int, device: torch.device):
        self.rows: dict[str, int] = {}
        self.totals = torch.zeros(0, num_filters, dtype=torch.float64, device=device)

    def _grow(self, labels: list[str]) -> None:
        """Give every new label a zero row."""
        new = [l for l in dict.fromkeys(labels) if l not in self.rows]
        if new:
            for l in new:
                self.rows[l] = len(self.rows)
            pad = self.totals.new_zeros(len(new), self.totals.shape[1])
            self.totals = torch.cat([self.totals, pad])

    def label_index(self, labels: list[str]) -> torch.Tensor:
        """Row of each label (new labels get a zero row), as int64 on the device."""
        self._grow(labels)
        return torch.tensor([self.rows[l] for l in labels], dtype=torch.int64, device=self.totals.device)

    def add(self, other: "LabelSums") -> None:
        """Add another run's sums row by row, on the device (float64, so the same as on the host), without
        a host-to-device index copy: one slice when the rows line up (the usual case), else row by row."""
        if not other.rows:
            return
        self._grow(list(other.rows))
        rows = [self.rows[l] for l in other.rows]
        if rows == list(range(rows[0], rows[0] + len(rows))):
            self.totals[rows[0]:rows[0] + len(rows)] += other.totals
        else:
            for j, r in enumerate(rows):
                self.totals[r] += other.totals[j]

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

