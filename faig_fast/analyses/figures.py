"""PNG figures of the analyses (matplotlib's Agg canvas; no pyplot, no global backend change).

* :func:`plot_masking_curves` — Fig. 3 analogue: output change vs fraction of masked filters.
* :func:`plot_layer_distribution` — Fig. 4 analogue: where the discovered filters sit, per layer.
* :func:`plot_image_grid` — Fig. 2 analogue: inputs, target outputs and outputs with filters masked.
* :func:`plot_modulation_strips` — outputs as the discovered filters move from θ̄ (λ=0) to θ (λ=1).

Every function writes its PNG atomically (temp file + ``os.replace``) and returns the path.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from faig_fast.utils.io import atomic_write
from faig_fast.core.filters import FilterIndex
from faig_fast.analyses.names import filter_set_name, input_name, method_name


def _save(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    return path


def _img(t: torch.Tensor) -> np.ndarray:
    t = t.detach().float().cpu()
    t = t[0] if t.dim() == 4 else t
    return t.clamp(0, 1).permute(1, 2, 0).numpy()


def plot_masking_curves(curves: dict, fractions: Sequence[float], path: str | os.PathLike,
                        title: str | None = None) -> Path:
    """``curves[method][mask_label][input_label]`` = values over ``fractions``; one panel per mask set."""
    mask_labels = sorted({m for by_mask in curves.values() for m in by_mask})
    fig = Figure(figsize=(5.2 * len(mask_labels), 4.0))
    x = 100 * np.asarray(fractions, dtype=float)
    colors = {"blur": "tab:blue", "noise": "tab:orange", "clean": "tab:green"}
    styles = {"faig": "-", "ig": "-.", "weight_change": ":", "random": "--"}
    for j, mask in enumerate(mask_labels):
        ax = fig.add_subplot(1, len(mask_labels), j + 1)
        for method, by_mask in curves.items():
            for inp, vals in by_mask.get(mask, {}).items():
                ax.plot(x, vals, styles.get(method, "-"), marker="o", ms=3, color=colors.get(inp),
                        label=f"{method_name(method)}, {input_name(inp, noun=True)}")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("masked filters (%)")
        ax.set_ylabel("gradient-map MSE (×10⁻³)")
        ax.set_title(f"mask {filter_set_name(mask)} filters")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def layer_counts(index: FilterIndex, indices: torch.Tensor) -> np.ndarray:
    """How many of ``indices`` fall in each conv layer (``index.layers`` order)."""
    pos = index.layer_of(torch.as_tensor(indices, dtype=torch.long).reshape(-1))
    return np.bincount(pos.numpy(), minlength=len(index.layers))


def plot_layer_distribution(index: FilterIndex, sets: dict[str, torch.Tensor], path: str | os.PathLike,
                            title: str | None = None) -> Path:
    """Grouped bars per layer: count of each set's filters, and their share of the layer's filters."""
    names = [l.name.removesuffix(".weight") for l in index.layers]
    sizes = np.array([l.num_filters for l in index.layers], dtype=float)
    x = np.arange(len(names))
    width = 0.8 / max(1, len(sets))
    fig = Figure(figsize=(max(6.0, 0.45 * len(names) + 2), 6.5))
    ax1, ax2 = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    for k, (label, idx) in enumerate(sets.items()):
        c = layer_counts(index, idx)
        off = (k - (len(sets) - 1) / 2) * width
        name = f"{filter_set_name(label)} ({len(idx)} filters)"
        ax1.bar(x + off, c, width, label=name)
        ax2.bar(x + off, 100 * c / sizes, width, label=name)
    ax1.set_ylabel("discovered filters")
    ax2.set_ylabel("% of the layer's filters")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    ax1.set_title(title or "where the discovered filters are (input → output)")
    fig.tight_layout()
    return _save(fig, path)


def plot_image_grid(rows: Sequence[tuple[str, Sequence[tuple[str, torch.Tensor]]]], path: str | os.PathLike,
                    title: str | None = None, cell: float = 2.6) -> Path:
    """A grid of images: ``rows`` = [(row label, [(column title, CHW image), ...]), ...]."""
    ncol = max(len(r[1]) for r in rows)
    fig = Figure(figsize=(cell * ncol, cell * len(rows) + 0.4))
    for i, (rlabel, cells) in enumerate(rows):
        for j, (ctitle, img) in enumerate(cells):
            ax = fig.add_subplot(len(rows), ncol, i * ncol + j + 1)
            ax.imshow(_img(img), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(ctitle, fontsize=8)
            if j == 0:
                ax.set_ylabel(rlabel, fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_modulation_strips(strips: dict[str, Sequence[torch.Tensor]], lams: Sequence[float],
                           path: str | os.PathLike, title: str | None = None) -> Path:
    """One row per strip (e.g. deblurring filters on a blurry input), one column per λ."""
    rows = [(name, [(f"λ = {lam:g}", img) for lam, img in zip(lams, imgs)]) for name, imgs in strips.items()]
    return plot_image_grid(rows, path, title=title)
