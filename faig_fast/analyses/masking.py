"""Masking discovered filters (paper Sec. 5.2.1, Table 2, Fig. 3).

"Masking" a filter replaces its K×K weights in the target model θ by the baseline's θ̄ (biases are
not filters and stay the target's, as in the authors' scripts). The effect is measured as the MSE
between *image-gradient maps* of the gray target output and the gray masked output, ×1000:

* gray = ITU-R BT.601 luma, Y = 0.299 R + 0.587 G + 0.114 B, on outputs clamped to [0, 1] and (by
  default) rounded to 8-bit levels, as the authors' outputs went through PNG files;
* gradient map = central-difference magnitude √(g_x² + g_y² + 10⁻⁶) with g_x = I(y, x+1) − I(y, x−1),
  g_y = I(y+1, x) − I(y−1, x) and zero padding: the kernels of the authors'
  ``analysis/scripts/generate_gradient_map.py``. (Their script reads the PNGs with the flag
  ``cv2.COLOR_BGR2GRAY`` = 6, which ``imread`` treats as a colour read, so in effect it measures the
  blue channel; we use the gray image the paper describes.)
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faig_fast.core.attribution import top_count
from faig_fast.data import DegradedImageDataset
from faig_fast.errors import InvalidInputError
from faig_fast.core.filters import FilterIndex
from faig_fast.core.pair import check_pair

TABLE_FRACTIONS = (0.01, 0.03, 0.05, 0.10)


def mask_filters(baseline: nn.Module, target: nn.Module, indices: torch.Tensor | Sequence[int]) -> nn.Module:
    """A copy of ``target`` whose filters ``indices`` (flat) hold the baseline's K×K weights.

    The pair comes in the order of :func:`faig_fast.attribute`: ``(baseline, target)``."""
    check_pair(baseline, target)
    rows = FilterIndex.from_model(target).split(indices)
    out = copy.deepcopy(target)
    sd_t, sd_b = out.state_dict(), baseline.state_dict()
    with torch.no_grad():
        for name, local in rows.items():
            w = sd_t[name].view(sd_t[name].shape[0] * sd_t[name].shape[1], -1)
            w[local] = sd_b[name].to(w).reshape(w.shape[0], -1)[local]
    return out


def to_gray(img: torch.Tensor) -> torch.Tensor:
    """ITU-R BT.601 luma of RGB images (..., 3, H, W) → (..., 1, H, W)."""
    coef = torch.tensor([0.299, 0.587, 0.114], dtype=img.dtype, device=img.device).view(3, 1, 1)
    return (img * coef).sum(-3, keepdim=True)


def gradient_map(img: torch.Tensor) -> torch.Tensor:
    """Central-difference gradient magnitude of the BT.601 gray image, (B, 1, H, W)."""
    x = img.unsqueeze(0) if img.dim() == 3 else img
    g = to_gray(x)
    gp = F.pad(g, (1, 1, 1, 1))
    gx = gp[..., 1:-1, 2:] - gp[..., 1:-1, :-2]
    gy = gp[..., 2:, 1:-1] - gp[..., :-2, 1:-1]
    return torch.sqrt(gx * gx + gy * gy + 1e-6)


def _prepare(img: torch.Tensor, quantize: bool) -> torch.Tensor:
    img = img.detach().double().clamp(0, 1)
    return torch.round(img * 255) / 255 if quantize else img


def gradient_map_mse(out_a: torch.Tensor, out_b: torch.Tensor, quantize: bool = False) -> float:
    """1000 × MSE between the gradient maps of the gray versions of two outputs (Table 2 units).

    Outputs are clamped to [0, 1]; ``quantize`` also rounds them to 8-bit levels first. For a batch
    the MSE is taken per image and averaged.
    """
    if out_a.shape != out_b.shape:
        raise InvalidInputError(f"outputs differ in shape: {tuple(out_a.shape)} vs {tuple(out_b.shape)}")
    ga, gb = gradient_map(_prepare(out_a, quantize)), gradient_map(_prepare(out_b, quantize))
    per_image = ((ga - gb) ** 2).flatten(1).mean(1)
    return float(per_image.mean()) * 1000.0


@torch.no_grad()
def _outputs(model: nn.Module, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    p = next(model.parameters())
    return [model((x.unsqueeze(0) if x.dim() == 3 else x).to(p)) for x in images]


def _stack_same_size(images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Batch images of equal size together (fewer, larger forward passes)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for x in images:
        x = x.unsqueeze(0) if x.dim() == 3 else x
        groups.setdefault(tuple(x.shape[1:]), []).append(x)
    return [torch.cat(v) for v in groups.values()]


def masking_curve(baseline: nn.Module, target: nn.Module, ranking: torch.Tensor, images: Sequence[torch.Tensor],
                  fractions: Sequence[float], *, quantize: bool = True) -> list[float]:
    """Mean ``gradient_map_mse`` (×10⁻³ units) between target and masked outputs over ``images``
    (LR inputs), masking the top ``fraction`` of ``ranking`` for each fraction (0 ⇒ nothing masked)."""
    batches = _stack_same_size(images)
    n_img = sum(len(b) for b in batches)
    ref = _outputs(target, batches)
    n = len(ranking)
    values = []
    for f in fractions:
        k = 0 if f <= 0 else top_count(n, min(float(f), 1.0))
        masked = mask_filters(baseline, target, ranking[:k])
        outs = _outputs(masked, batches)
        total = sum(gradient_map_mse(o, r, quantize) * len(o) for o, r in zip(outs, ref))
        values.append(total / n_img)
    return values


def degraded_inputs(gts: Sequence[tuple[str, torch.Tensor]], labels: Sequence[str] = ("blur", "noise"), *,
                    scale: int = 2, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """{label: [LR image per GT]} from ``DegradedImageDataset`` (noise seeded by ``seed``)."""
    ds = DegradedImageDataset(list(gts), tuple(labels), scale=scale, seed=seed)
    out: dict[str, list[torch.Tensor]] = {l: [] for l in labels}
    for i in range(len(ds)):
        lq, _, label = ds[i]
        out[label].append(lq)
    return out


RankingsFn = Callable[[int], dict[str, dict[str, torch.Tensor]]]


def masking_table(baseline: nn.Module, target: nn.Module, rankings: dict[str, dict[str, torch.Tensor]] | RankingsFn,
                  gts: Sequence[tuple[str, torch.Tensor]], *, seeds: Sequence[int] = (0, 1, 2),
                  fractions: Sequence[float] = TABLE_FRACTIONS, scale: int = 2, quantize: bool = True,
                  inputs: Sequence[str] = ("blur", "noise")) -> dict:
    """Table 2: output change (×10⁻³) for every input degradation × masked filter set × method × p.

    ``rankings`` is ``{method: {filter_label: ranking}}``, or a function ``seed -> that`` (use it to
    let the random baseline vary with the seed). Each seed also re-draws the noise of the degraded
    inputs made from ``gts``. Returns a JSON-able dict with per-seed ``values[input][mask][method]``
    (a list over seeds of lists over fractions) and ``mean``/``std`` (population std over seeds)
    of the same shape minus the seed axis.
    """
    values: dict = {}
    methods: list[str] = []
    for seed in seeds:
        ranks = rankings(seed) if callable(rankings) else rankings
        methods = list(ranks)
        lqs = degraded_inputs(gts, inputs, scale=scale, seed=seed)
        batches = {inp: _stack_same_size(lqs[inp]) for inp in inputs}
        refs = {inp: _outputs(target, batches[inp]) for inp in inputs}
        for method, by_label in ranks.items():
            for mask_label, ranking in by_label.items():
                # one masked model per fraction, evaluated on every input degradation
                n = len(ranking)
                masked = [mask_filters(baseline, target, ranking[:top_count(n, f)]) for f in fractions]
                for inp in inputs:
                    n_img = len(lqs[inp])
                    row = []
                    for m in masked:
                        outs = _outputs(m, batches[inp])
                        row.append(sum(gradient_map_mse(o, r, quantize) * len(o)
                                       for o, r in zip(outs, refs[inp])) / n_img)
                    values.setdefault(inp, {}).setdefault(mask_label, {}).setdefault(method, []).append(row)
    mean = {i: {m: {k: np.mean(v, 0).tolist() for k, v in d2.items()} for m, d2 in d1.items()} for i, d1 in values.items()}
    std = {i: {m: {k: np.std(v, 0).tolist() for k, v in d2.items()} for m, d2 in d1.items()} for i, d1 in values.items()}
    return {"fractions": list(fractions), "seeds": list(seeds), "methods": methods, "inputs": list(inputs),
            "quantize": quantize, "values": values, "mean": mean, "std": std}
