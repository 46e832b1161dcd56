"""Figures of local attribution maps, as in Gu & Dong (CVPR 2021), Fig. 1/5: the model output with the
window box, the attribution overlaid on the input, the area of contribution (a kernel density of the
pixels weighted by the attribution) and the diffusion index in the caption.  A grid puts several
images/windows (rows) and models (columns) side by side for dataset runs.

matplotlib's Agg canvas, no pyplot; every PNG is written atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from faig_fast.utils.io import atomic_write

#: The reference's colour map for attributions (its ``vis_saliency`` draws map·0.5 + 0.5 in it).
CMAP = "seismic"


def attribution_strength(attribution: torch.Tensor) -> np.ndarray:
    """|Σ_c A| / max|Σ_c A| (H, W) in [0, 1] (what DI measures); NaN where A is not finite."""
    a = attribution.detach().to("cpu", torch.float64)
    v = (a.sum(0) if a.dim() == 3 else a).abs().numpy()
    top = np.nanmax(v) if np.isfinite(v).any() else 0.0
    return v / top if top > 0 else v


def contribution_density(v: np.ndarray) -> np.ndarray | None:
    """The reference's "area of contribution": a Gaussian kernel density of the pixel positions weighted
    by ``v`` (Scott's bandwidth on the weighted position covariance, as ``scipy.stats.gaussian_kde``),
    evaluated on the pixel grid by one FFT convolution and scaled to max 1; ``None`` when ``v`` has no
    finite positive mass or a degenerate spread."""
    if not np.isfinite(v).all() or v.sum() <= 0:
        return None
    h, w = v.shape
    wts = v / v.sum()
    yy, xx = np.mgrid[0:h, 0:w]
    pos = np.stack([xx.ravel(), yy.ravel()]).astype(np.float64)
    cov = np.cov(pos, aweights=wts.ravel(), bias=False)
    n_eff = 1.0 / np.sum(wts ** 2)
    cov = np.atleast_2d(cov) * n_eff ** (-2.0 / 6.0)  # Scott: factor n_eff^(−1/(d+4)), squared
    if not np.isfinite(cov).all() or np.linalg.det(cov) <= 1e-12:
        return None
    ry, rx = (int(min(n - 1, np.ceil(4 * np.sqrt(cov[i, i])))) for i, n in ((1, h), (0, w)))
    ky, kx = np.mgrid[-ry:ry + 1, -rx:rx + 1]
    d = np.stack([kx.ravel(), ky.ravel()])
    inv = np.linalg.inv(cov)
    kernel = np.exp(-0.5 * np.einsum("in,ij,jn->n", d, inv, d)).reshape(ky.shape)
    z = _convolve_same(wts, kernel)
    z = np.clip(z, 0, None)
    return z / z.max() if z.max() > 0 else None


def _convolve_same(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Zero-padded 2-D convolution of ``a`` with the odd-sided ``k``, cropped to ``a``'s shape (by FFT)."""
    shape = (a.shape[0] + k.shape[0] - 1, a.shape[1] + k.shape[1] - 1)
    full = np.fft.irfft2(np.fft.rfft2(a, shape) * np.fft.rfft2(k, shape), shape)
    r0, c0 = k.shape[0] // 2, k.shape[1] // 2
    return full[r0:r0 + a.shape[0], c0:c0 + a.shape[1]]


def _rgb(t: torch.Tensor | None) -> np.ndarray | None:
    """(C, H, W) tensor → (H, W, 3) float in [0, 1] (gray repeated; extra channels dropped)."""
    if t is None:
        return None
    a = t.detach().float().cpu().clamp(0, 1).numpy()
    a = np.repeat(a[:1], 3, 0) if a.shape[0] < 3 else a[:3]
    return np.moveaxis(a, 0, 2)


def _upsample(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of (H, W[, 3]) to ``shape`` (the reference zooms maps this way)."""
    h, w = a.shape[:2]
    rows = np.minimum((np.arange(shape[0]) * h) // shape[0], h - 1)
    cols = np.minimum((np.arange(shape[1]) * w) // shape[1], w - 1)
    return a[rows][:, cols]


def _overlay(v: np.ndarray, base: np.ndarray | None, alpha: float) -> np.ndarray:
    """The map in the seismic colour map (v·0.5 + 0.5), blended with ``base`` (weight ``alpha``)."""
    colour = colormaps[CMAP](np.nan_to_num(v, nan=0.0) * 0.5 + 0.5)[..., :3]
    if base is None:
        return colour
    return (1 - alpha) * colour + alpha * _upsample(base, colour.shape[:2])


def _box(ax: Any, window: Sequence[int], colour: str = "red") -> None:
    row, col, size = window
    ax.add_patch(Rectangle((col - 0.5, row - 0.5), size, size, fill=False, edgecolor=colour, linewidth=1.5))


def _panels(axes: Sequence[Any], image: torch.Tensor | None, output: torch.Tensor | None,
            attribution: torch.Tensor, window: Sequence[int], alpha: float, with_output: bool = True) -> None:
    """Output with box (optional), attribution over the input, area of contribution over the input."""
    base = _rgb(image)
    v = attribution_strength(attribution)
    axes = list(axes)
    for ax in axes:
        ax.set_xticks([]), ax.set_yticks([])
    if with_output:
        ax = axes.pop(0)
        out = _rgb(output)
        if out is not None:
            ax.imshow(out, interpolation="nearest")
            _box(ax, window)
        ax.set_title("output + window", fontsize=8)
    axes[0].imshow(_overlay(v, base, alpha), interpolation="nearest")
    axes[0].set_title("LAM on the input", fontsize=8)
    density = contribution_density(v)
    if density is not None:
        axes[1].imshow(_overlay(density, base, alpha), interpolation="bilinear")
    else:
        axes[1].text(0.5, 0.5, "map not finite\nor all zero", ha="center", va="center", fontsize=8)
    axes[1].set_title("area of contribution", fontsize=8)


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight")
    return path


def _caption(meta: dict, di: float, nan: int) -> str:
    row, col, size = meta.get("window", ("?", "?", "?"))
    text = (f"DI = {di:.2f}   window (row {row}, col {col}, size {size})   {meta.get('architecture', '')}   "
            f"{meta.get('rule', '')}, σ₀ = {meta.get('sigma', '')}, l = {meta.get('kernel_size', '')}")
    return text + (f"   {nan} non-finite gradient entries" if nan else "")


def lam_figure(result: Any, path: str | os.PathLike, *, alpha: float = 0.5, dpi: int = 150) -> Path:
    """The paper-style figure of one :class:`~faig_fast.core.lam.LocalAttribution` as a PNG."""
    fig = Figure(figsize=(9, 3.4))
    axes = fig.subplots(1, 3)
    _panels(axes, result.image, result.output, result.attribution, result.window, alpha)
    fig.subplots_adjust(bottom=0.12)
    fig.text(0.5, 0.06, _caption(result.meta, result.diffusion_index, result.nan_gradients), ha="center", fontsize=9)
    return _save(fig, path, dpi)


def lam_grid_figure(rows: Sequence[dict], path: str | os.PathLike, *, alpha: float = 0.5, dpi: int = 110,
                    max_rows: int = 16) -> Path:
    """A grid for dataset runs: one row per (image, window) — ``{"name", "image", "output", "window",
    "maps": {model: (attribution, DI)}}`` — with the output and the window box, then for each model
    its attribution and area of contribution, the DI in the column title."""
    rows = list(rows)[:max_rows]
    models = list(rows[0]["maps"]) if rows else []
    ncols = 1 + 2 * len(models)
    fig = Figure(figsize=(2.0 * ncols, 2.1 * max(1, len(rows))))
    axes = np.atleast_2d(fig.subplots(max(1, len(rows)), ncols, squeeze=False))
    for r, row in enumerate(rows):
        ax = axes[r, 0]
        out = _rgb(row.get("output"))
        if out is not None:
            ax.imshow(out, interpolation="nearest")
            _box(ax, row["window"])
        ax.set_title(f"{row['name']}\n{tuple(row['window'])}", fontsize=7)
        ax.set_xticks([]), ax.set_yticks([])
        for m, model in enumerate(models):
            attribution, di = row["maps"][model]
            cells = axes[r, 1 + 2 * m:3 + 2 * m]
            _panels(cells, row.get("image"), None, attribution, row["window"], alpha, with_output=False)
            cells[0].set_title(f"{model}: DI {di:.2f}", fontsize=7)
    return _save(fig, path, dpi)
