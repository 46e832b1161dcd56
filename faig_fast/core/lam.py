"""``faig_fast.lam``: local attribution maps (LAM, Gu & Dong, CVPR 2021) on the FAIG engine.

A = ∫₀¹ ∇ₓD(F(x(α))) ⊙ x′(α) dα along the progressive-blur input path of
:mod:`faig_fast.core.blur_path`, where D sums the output's gradient magnitude over a window.  The
diffusion index DI = (1 − Gini(|Σ_c A| / max|Σ_c A|)) × 100 says how spread out the pixels are that
the window's detail comes from.

Module semantics are :class:`~faig_fast.core.engine.ModuleRunner`'s (private copy of the model in
``mode``, precision, autocast, chunk planning and the one out-of-memory back-off): the nodes of an
image — and of several images of one size — go through batched passes, each pass on fresh inputs;
the windows of an image share those passes (one backward per window slot).  Accumulation is in
float64.  Non-finite gradients are counted, never zeroed: the map is NaN where they were.  D is
evaluated on the window (and the right/lower neighbours its differences need) only: the reference
takes the square root over the whole output before cropping, so a flat region anywhere gives it
NaN gradients (which it then zeroes, together with genuine ones inside the window).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

import faig_fast
from faig_fast.core.batches import model_scale
from faig_fast.core.blur_path import BlurPath, PathNodes, check_kernel_args, path_nodes
from faig_fast.core.engine import ModuleRunner
from faig_fast.core.pair import model_hash
from faig_fast.core.quadrature import METHODS as QUADRATURE_METHODS
from faig_fast.errors import FAIGError, InvalidInputError
from faig_fast.utils.io import atomic_save_safetensors, atomic_write_json

#: ``"lam"`` is the reference's discretisation; the others are the quadrature rules with the analytic x′(α).
METHODS = ("lam", *QUADRATURE_METHODS)

Window = tuple[int, int, int]

#: Gauss–Legendre nodes of the fast rule (``method="gausslegendre"``): the fewest whose maps match a
#: converged one (the reference's rule at 400 steps; mean Pearson r ≥ 0.999) with a DI as close as the
#: reference's 50 steps (`faig study lam`, benchmarks/results/study-lam-msrresnet_small.json).
FAST_LAM_NODES = 24
_META_KEY = "faig_fast_lam"


# objective, Gini, DI -------------------------------------------------------------------------------
def window_objective(out: torch.Tensor, window: Window) -> torch.Tensor:
    """D per sample of ``out`` (B, C, H, W): Σ over channels and the window's pixels (i, j) of
    sqrt((y[i,j] − y[i+1,j])² + (y[i,j] − y[i,j+1])²), forward differences, as the reference's
    ``attr_grad`` (the last row/column, which has none, is left out)."""
    row, col, size = window
    if out.dtype in (torch.bfloat16, torch.float16):
        out = out.float()
    y = out[:, :, row:row + size + 1, col:col + size + 1]
    dh = y[:, :, :-1, :-1] - y[:, :, 1:, :-1]
    dw = y[:, :, :-1, :-1] - y[:, :, :-1, 1:]
    return torch.sqrt(dh * dh + dw * dw).sum((1, 2, 3))


def gini(values: np.ndarray | torch.Tensor) -> float:
    """The reference's Gini coefficient (float64): shift to non-negative, add 1e-7, sort ascending,
    Σ_i (2i − n − 1)·v_i / (n·Σ_i v_i), i = 1..n."""
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).ravel()
    if v.size == 0:
        raise InvalidInputError("gini of an empty array")
    if v.min() < 0:
        v = v - v.min()
    v = np.sort(v + 1e-7)
    n = v.size
    i = np.arange(1, n + 1)
    return float(np.sum((2 * i - n - 1) * v) / (n * np.sum(v)))


def diffusion_index(attribution: torch.Tensor) -> float:
    """DI = (1 − Gini(v)) × 100, v = |Σ_c A| / max|Σ_c A|; NaN when A is not finite or all zero."""
    a = attribution.detach().to("cpu", torch.float64)
    v = a.sum(0).abs() if a.dim() == 3 else a.abs()
    top = float(v.max()) if v.numel() else 0.0
    if not math.isfinite(top) or not bool(torch.isfinite(v).all()) or top == 0.0:
        return float("nan")
    return (1.0 - gini(v / top)) * 100.0


# result --------------------------------------------------------------------------------------------
@dataclass
class LocalAttribution:
    """The LAM of one window: ``attribution`` (C, H, W) float64 on the host (Σ A ≈ D(F(x)) −
    D(F(x(0)))), ``diffusion_index``, ``completeness`` (relative error of that sum; absolute when
    the difference is 0), ``nan_gradients`` (non-finite gradient entries seen), ``meta`` (rule, steps,
    σ, l, window, model hash, seconds, ...), and the ``image`` (C, H, W) and model ``output``
    (C', H', W') the figure shows."""

    attribution: torch.Tensor
    diffusion_index: float
    completeness: float
    nan_gradients: int
    meta: dict[str, Any] = field(default_factory=dict)
    image: torch.Tensor | None = None
    output: torch.Tensor | None = None

    @property
    def window(self) -> Window:
        return tuple(self.meta["window"])

    def summary(self) -> dict[str, Any]:
        """The JSON-able scalars: DI, completeness, NaN count and meta."""
        return {"diffusion_index": _json_float(self.diffusion_index), "completeness": _json_float(self.completeness),
                "nan_gradients": self.nan_gradients, **self.meta}

    def save(self, path: str | os.PathLike) -> Path:
        """The map (and image, output) as safetensors at ``path`` and the summary as ``<path>.json``
        beside it (same stem), both written atomically."""
        path = Path(path)
        tensors = {"attribution": self.attribution.contiguous()}
        for name in ("image", "output"):
            t = getattr(self, name)
            if t is not None:
                tensors[name] = t.detach().cpu().contiguous()
        doc = self.summary()
        atomic_save_safetensors(tensors, {_META_KEY: json.dumps(doc)}, path)
        atomic_write_json(path.with_suffix(".json"), doc)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LocalAttribution":
        """A result written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                doc = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            raise InvalidInputError(f"{path} is not a LAM result written by LocalAttribution.save ({e})") from e
        meta = {k: v for k, v in doc.items() if k not in ("diffusion_index", "completeness", "nan_gradients")}
        return cls(tensors["attribution"], _float(doc["diffusion_index"]), _float(doc["completeness"]),
                   int(doc["nan_gradients"]), meta, tensors.get("image"), tensors.get("output"))

    def save_figure(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        """The paper-style figure (see :func:`faig_fast.core.lam_figures.lam_figure`)."""
        from faig_fast.core.lam_figures import lam_figure

        return lam_figure(self, path, **kwargs)


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _float(x: Any) -> float:
    return float("nan") if x is None else float(x)


# validation ----------------------------------------------------------------------------------------
def as_image(image: Any, where: str = "image") -> torch.Tensor:
    """(C, H, W) float image from (C, H, W) or (1, C, H, W); finite and in [0, 1], else InvalidInputError."""
    if not isinstance(image, torch.Tensor):
        raise InvalidInputError(f"{where} must be a torch.Tensor (C, H, W), got {type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise InvalidInputError(f"{where} must be (C, H, W) or (1, C, H, W), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise InvalidInputError(f"{where} must be a float tensor in [0, 1], got dtype {image.dtype}")
    if min(image.shape) == 0:
        raise InvalidInputError(f"{where} is empty, shape {tuple(image.shape)}")
    if not bool(torch.isfinite(image).all()):
        raise InvalidInputError(f"{where} contains NaN or Inf")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidInputError(f"{where} values must lie in [0, 1], found [{lo:.4g}, {hi:.4g}]")
    return image


def as_windows(window: Any) -> tuple[list[Window], bool]:
    """``(row, col, size)`` or a list of them → (windows, single)."""
    def one(w: Any) -> Window:
        if (not isinstance(w, (tuple, list)) or len(w) != 3
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in w)):
            raise InvalidInputError(f"a window is (row, col, size) of integers, got {w!r}")
        return int(w[0]), int(w[1]), int(w[2])

    if isinstance(window, (tuple, list)) and len(window) == 3 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in window):
        return [one(window)], True
    if not isinstance(window, (tuple, list)) or len(window) == 0:
        raise InvalidInputError(f"window must be (row, col, size) or a non-empty list of them, got {window!r}")
    return [one(w) for w in window], False


def check_window(window: Window, out_hw: tuple[int, int], where: str = "window") -> None:
    """The window must lie inside the output and cover a pixel with forward differences."""
    row, col, size = window
    h, w = out_hw
    if size < 1 or row < 0 or col < 0 or row + size > h or col + size > w or row >= h - 1 or col >= w - 1:
        raise InvalidInputError(
            f"{where} (row={row}, col={col}, size={size}) is outside the model's {h}x{w} output: it needs "
            f"size >= 1, 0 <= row, row + size <= {h}, 0 <= col, col + size <= {w}, and a pixel with a "
            f"right and lower neighbour (row < {h - 1}, col < {w - 1})")


# the attributor ------------------------------------------------------------------------------------
@dataclass
class _Item:
    """One image of a same-size group: its path, windows, per-slot sums and NaN counts (on the device)."""

    path: BlurPath
    windows: list[Window]
    sums: list[torch.Tensor]
    nans: list[torch.Tensor]


class LocalAttributor:
    """One model prepared for LAM: a :class:`ModuleRunner`, the discretised blur path and provenance.
    Reused over many images (dataset mode, benchmarks)."""

    def __init__(self, model: nn.Module, *, steps: int = 50, method: str = "lam", sigma: float = 1.2,
                 kernel_size: int = 9, device: torch.device | str | None = None, precision: str = "fp32",
                 internal_batch_size: int | None = None, mode: str = "eval", memory_budget: int | None = None):
        if method not in METHODS:
            raise InvalidInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if internal_batch_size is not None and (isinstance(internal_batch_size, bool)
                                                or not isinstance(internal_batch_size, int) or internal_batch_size < 1):
            raise InvalidInputError(f"internal_batch_size must be a positive integer or None, got {internal_batch_size!r}")
        self.sigma, self.kernel_size = check_kernel_args(sigma, kernel_size)
        self.nodes: PathNodes = path_nodes(method, steps, self.sigma, self.kernel_size)
        self.runner = ModuleRunner(model, device=device, precision=precision, mode=mode,
                                   chunk_size=internal_batch_size, memory_budget=memory_budget)
        self.method, self.steps = method, steps
        self.one_at_a_time = _mixes_batch(self.runner.net)
        self.scale = model_scale(model)
        self.meta = {"method": method, "steps": steps, "rule": f"{method}/{steps}", "sigma": self.sigma,
                     "kernel_size": self.kernel_size, "precision": precision, "device": str(self.runner.device),
                     "mode": mode, "architecture": type(model).__name__, "model_sha256": model_hash(model),
                     "version": faig_fast.__version__}
        self._buffers = {n: b.detach().clone() for n, b in self.runner.net.named_buffers()}

    # passes --------------------------------------------------------------------------------------
    def _fresh_state(self) -> None:
        """Outside eval mode a pass may update buffers (running statistics): every pass starts from the copy's."""
        if self.runner.mode != "eval" and self._buffers:
            with torch.no_grad():
                for n, b in self.runner.net.named_buffers():
                    b.copy_(self._buffers[n])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The private network on a fresh copy of ``x`` (B, C, H, W)."""
        self._fresh_state()

        def run() -> torch.Tensor:
            with self.runner.autocast():
                return self.runner.net(x.clone())
        out = self.runner.check_private(run)
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InvalidInputError(f"{self.runner.name} must map (B, C, H, W) to (B, C', H', W'); for an input of "
                                    f"{tuple(x.shape)} it returned {got}")
        return out

    def _no_grad_forward(self, xs: torch.Tensor, where: str) -> torch.Tensor:
        """F of each row of ``xs`` without grad (one row per pass when batching would mix rows); a model
        that cannot run on the input size raises a clear error."""
        outs: list[torch.Tensor] = []
        step = 1 if self.one_at_a_time else xs.shape[0]
        try:
            with torch.no_grad():
                for s in range(0, xs.shape[0], step):
                    outs.append(self.forward(xs[s:s + step]))
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            if isinstance(e, FAIGError):
                raise
            raise InvalidInputError(f"{where}: {self.runner.name} cannot run on an input of shape "
                                    f"{tuple(xs.shape[1:])} (C, H, W): {type(e).__name__}: {e}") from e
        return torch.cat(outs)

    def output_shape(self, image: torch.Tensor, where: str = "image") -> tuple[int, int, int]:
        """(C', H', W') of the model's output for ``image`` (C, H, W), from one forward pass."""
        r = self.runner
        with r.math_mode():
            out = self._no_grad_forward(as_image(image, where)[None].to(r.device, r.dtype), where)
        return tuple(out.shape[1:])

    def _endpoints(self, paths: list[BlurPath], where: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """F(x) of each image (B, C', H', W') and F(x(0)) of each blurred baseline, no grad."""
        xs = torch.cat([p.image[None] for p in paths] + [p.at(0.0, self.sigma, self.kernel_size) for p in paths])
        out = self._no_grad_forward(xs, where[0])
        return out[:len(paths)], out[len(paths):]

    # public --------------------------------------------------------------------------------------
    def attribute(self, images: Sequence[torch.Tensor], windows: Sequence[Sequence[Window]], *,
                  progress: bool = False, names: Sequence[str] | None = None) -> list[list[LocalAttribution]]:
        """LAM of every window of every image; images of one size share batched passes."""
        t0 = time.perf_counter()
        names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        imgs = [as_image(im, n) for im, n in zip(images, names)]
        if len(imgs) != len(windows) or not imgs:
            raise InvalidInputError(f"{len(imgs)} images but {len(windows)} window lists")
        groups: dict[tuple, list[int]] = {}
        for i, im in enumerate(imgs):
            groups.setdefault(tuple(im.shape), []).append(i)
        out: list[list[LocalAttribution] | None] = [None] * len(imgs)
        r = self.runner
        with r.math_mode():
            for idx in groups.values():
                res = self._group([imgs[i] for i in idx], [list(windows[i]) for i in idx], [names[i] for i in idx],
                                  progress)
                for i, rs in zip(idx, res):
                    out[i] = rs
        seconds = time.perf_counter() - t0
        for rs in out:
            for res in rs:
                res.meta["seconds"] = seconds
        return out  # type: ignore[return-value]

    def _group(self, images: list[torch.Tensor], windows: list[list[Window]], names: list[str],
               progress: bool) -> list[list[LocalAttribution]]:
        r = self.runner
        paths = [BlurPath(im.to(r.device, r.dtype), self.nodes) for im in images]
        out_x, out_0 = self._endpoints(paths, names)
        for ws, n in zip(windows, names):
            for w in ws:
                check_window(w, tuple(out_x.shape[-2:]), f"{n}: window")
        items = [_Item(p, ws, [torch.zeros(p.image.shape, dtype=torch.float64, device=r.device) for _ in ws],
                       [torch.zeros((), dtype=torch.int64, device=r.device) for _ in ws])
                 for p, ws in zip(paths, windows)]
        self._integrate(items, progress)
        return [self._results(it, out_x[b], out_0[b], im)
                for b, (it, im) in enumerate(zip(items, images))]

    def _integrate(self, items: list[_Item], progress: bool) -> None:
        """Σ_k w_k ∇ₓD_j(F(x(α_k))) ⊙ x′(α_k) into each item's slot j, in chunks of (image, node) rows."""
        r, n_nodes = self.runner, len(self.nodes)
        total = n_nodes * len(items)
        x1 = items[0].path.image[None]
        item_bytes = r.saved_bytes(("lam", tuple(x1.shape)), lambda: self.forward(x1.clone().requires_grad_()))
        item_bytes += 6 * x1.numel() * 8  # input, derivative, gradient, float64 products
        chunk = 1 if self.one_at_a_time else r.plan_chunk(total, item_bytes)
        weights = self.nodes.weights.to(r.device, torch.float64)
        with tqdm(total=total, desc="LAM", unit="node", disable=not progress) as bar, \
                r.explained(lambda: self.forward(x1)), r.cpu_layout():
            def run(start: int, stop: int) -> None:
                self._chunk(items, start, stop, weights)
                bar.update(stop - start)
            r.run_chunks(total, chunk, run)

    def _chunk(self, items: list[_Item], start: int, stop: int, weights: torch.Tensor) -> None:
        """One batched pass over rows [start, stop) (row = image · N + node), one backward per window slot;
        the chunk's sums are added only when all of it succeeded (an out-of-memory retry starts clean)."""
        n_nodes = len(self.nodes)
        segs = []  # (item, first row in chunk, node start, node stop)
        row = start
        while row < stop:
            b, k = divmod(row, n_nodes)
            k_stop = min(n_nodes, k + stop - row)
            segs.append((items[b], row - start, k, k_stop))
            row += k_stop - k
        x = torch.cat([it.path.inputs(k0, k1) for it, _, k0, k1 in segs]).requires_grad_()
        out = self.forward(x)
        slots = max(len(it.windows) for it, *_ in segs)
        # w_k · x′(α_k) per segment, float64, computed once and shared by the window slots
        scaled = [weights[k0:k1].view(-1, 1, 1, 1) * it.path.derivatives(k0, k1).double() for it, _, k0, k1 in segs]
        adds = []
        for j in range(slots):
            objective = sum(window_objective(out[o:o + k1 - k0], it.windows[j]).sum()
                            for it, o, k0, k1 in segs if j < len(it.windows))
            (g,) = torch.autograd.grad(objective, x, retain_graph=j < slots - 1)
            for (it, o, k0, k1), wd in zip(segs, scaled):
                if j < len(it.windows):
                    gi = g[o:o + k1 - k0]
                    adds.append((it, j, (gi.double() * wd).sum(0), (~torch.isfinite(gi)).sum()))
        for it, j, s, nan in adds:
            it.sums[j].add_(s)
            it.nans[j].add_(nan)

    def _results(self, item: _Item, out_x: torch.Tensor, out_0: torch.Tensor,
                 image: torch.Tensor) -> list[LocalAttribution]:
        """Host results of one image: map, DI, completeness against D(F(x)) − D(F(x(0)))."""
        results = []
        output = out_x.detach().float().cpu()
        for w, s, nan in zip(item.windows, item.sums, item.nans):
            d1 = float(window_objective(out_x[None], w)[0])
            d0 = float(window_objective(out_0[None], w)[0])
            a = s.cpu()
            total, diff = float(a.sum()), d1 - d0
            err = abs(total - diff) / abs(diff) if diff != 0 else abs(total - diff)
            meta = {**self.meta, "window": list(w), "scale": self.scale or _ratio(image.shape[-2:], out_x.shape[-2:]),
                    "d_input": d1, "d_baseline": d0, "attribution_sum": total,
                    "windows_in_call": len(item.windows)}
            results.append(LocalAttribution(a, diffusion_index(a), err, int(nan), meta, image.detach().cpu(), output))
        return results


def _ratio(in_hw: Sequence[int], out_hw: Sequence[int]) -> int | None:
    (h, w), (hh, ww) = in_hw, out_hw
    return hh // h if hh % h == 0 and ww % w == 0 and hh // h == ww // w else None


def _mixes_batch(net: nn.Module) -> bool:
    """True when some module normalises over the batch in this mode (BatchNorm in training): batched
    nodes would mix, so they run one at a time."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in net.modules())


def lam(model: nn.Module, image: torch.Tensor, window: Window | Sequence[Window], *, steps: int = 50,
        method: str = "lam", sigma: float = 1.2, kernel_size: int = 9, device: torch.device | str | None = None,
        precision: str = "fp32", internal_batch_size: int | None = None, mode: str = "eval",
        progress: bool = False) -> LocalAttribution | list[LocalAttribution]:
    """Local attribution map of ``window`` = ``(row, col, size)`` (output pixels) of ``model`` on
    ``image`` ((C, H, W) or (1, C, H, W), values in [0, 1]); a list of windows gives a list of
    results that share the forward passes.

    ``method="lam"`` with ``steps`` is the reference's discretisation (α_i = i/N, finite-difference
    kernel derivative, mean over steps); ``"gausslegendre"`` and the Riemann rules use the analytic
    derivative of the blur kernel.  ``sigma`` (σ₀) and ``kernel_size`` (l) define the blur path.
    ``precision`` is one of ``fp32``, ``tf32``, ``bf16``, ``fp64``; ``internal_batch_size`` caps the
    nodes of one batched pass; ``mode`` is the module mode of the passes (``eval``, ``train``, ``as-is``).
    The caller's model is never modified.
    """
    windows, single = as_windows(window)
    image = as_image(image)
    att = LocalAttributor(model, steps=steps, method=method, sigma=sigma, kernel_size=kernel_size, device=device,
                          precision=precision, internal_batch_size=internal_batch_size, mode=mode)
    results = att.attribute([image], [windows], progress=progress)[0]
    return results[0] if single else results
