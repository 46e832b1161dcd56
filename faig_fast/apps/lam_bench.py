"""LAM benchmarks and the node-count study (the lead wires them into ``faig bench`` / ``faig study``).

* :func:`naive_lam` — the reference's structure: blurs on the host, batch 1, one step at a time, a
  host round trip per step (the baseline the engine is timed against);
* :func:`bench_lam` — on one model and image, side by side in one process: the naive loop at
  ``steps``, ``method="lam"`` at ``steps`` (exact, batched), the fast rule (Gauss–Legendre at its
  converged node count), and K windows in one call against K single calls; seconds, peak memory and
  agreement (Pearson r of the maps, DI difference) against the exact map;
* :func:`run_lam_benchmarks` — those cases on a shipped pair at 64×64 LR and on full Set14 images;
* :func:`lam_study` — the fewest Gauss–Legendre nodes whose map has Pearson r ≥ 0.999 against a
  converged map (the reference's rule at 400 steps) and whose DI is as close to the converged DI as
  the reference's 50 steps are (or within 1 %).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from faig_fast.core.blur_path import DEFAULT_KERNEL_SIZE, DEFAULT_SIGMA, gaussian_kernels
from faig_fast.core.lam import FAST_LAM_NODES, LocalAttributor, Window, diffusion_index, window_objective
from faig_fast.utils.device import sync
from faig_fast.utils.io import atomic_write_json
from faig_fast.utils.memory import peak_rss_bytes, reset_peak_rss
from faig_fast.utils.paths import data_root, results_dir, shipped_pair_dir


# the naive loop ------------------------------------------------------------------------------------
def _host_filter(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """``img`` (C, H, W) correlated with ``kernel`` (l, l) on the host, reflect-101 borders (numpy)."""
    p = kernel.shape[0] // 2
    padded = np.pad(img, ((0, 0), (p, p), (p, p)), mode="reflect")
    h, w = img.shape[1:]
    out = np.zeros_like(img)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            out += kernel[i, j] * padded[:, i:i + h, j:j + w]
    return out


def naive_lam(model: nn.Module, image: torch.Tensor, window: Window, steps: int = 50,
              sigma: float = DEFAULT_SIGMA, kernel_size: int = DEFAULT_KERNEL_SIZE,
              device: torch.device | str = "cpu") -> np.ndarray:
    """The reference's loop (float32): host blurs, then per step one batch-1 forward+backward on
    ``device`` and the gradient back on the host; NaN gradients zeroed as the reference does."""
    net = model.to(device).float().eval()
    x = image.detach().float().cpu().numpy()
    ks = gaussian_kernels(torch.from_numpy(np.linspace(sigma, 0, steps + 1)), kernel_size).numpy()
    total = np.zeros_like(x)
    for i in range(steps):
        xi = _host_filter(x, ks[i + 1]).astype(np.float32)
        deriv = _host_filter(x, (ks[i + 1] - ks[i]) * steps).astype(np.float32)
        t = torch.from_numpy(xi)[None].to(device).requires_grad_()
        objective = window_objective(net(t.clone()), window).sum()
        (g,) = torch.autograd.grad(objective, t)
        g = g[0].cpu().numpy()
        g[np.isnan(g)] = 0.0
        total += g * deriv
    return total / steps


# measurements --------------------------------------------------------------------------------------
def pearson(a: Any, b: Any) -> float:
    """Pearson r of two maps (flattened, float64); NaN when either is constant or not finite."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if not (np.isfinite(x).all() and np.isfinite(y).all()) or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def _timed(fn: Callable[[], Any], device: torch.device, repeat: int) -> tuple[float, int, Any]:
    """Best-of-``repeat`` seconds, peak memory (CUDA: max allocated; CPU: the process's peak RSS during
    the case) and the last result."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_peak_rss()
    best, out = math.inf, None
    for _ in range(max(1, repeat)):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    return best, int(peak), out


def _agreement(m: Any, ref: Any) -> dict[str, float]:
    m = torch.as_tensor(np.asarray(m, dtype=np.float64))
    ref = torch.as_tensor(np.asarray(ref, dtype=np.float64))
    return {"pearson_r": pearson(m, ref), "di": diffusion_index(m), "di_difference": diffusion_index(m) - diffusion_index(ref)}


def bench_lam(model: nn.Module, image: torch.Tensor, windows: Sequence[Window], *, steps: int = 50,
              fast_nodes: int = FAST_LAM_NODES, device: torch.device | str = "cpu", precision: str = "fp32",
              repeat: int = 1, cases: Sequence[str] = ("naive", "lam", "fast", "windows")) -> dict:
    """Seconds, peak memory and agreement with the exact map of each case on one image.

    ``naive`` / ``lam`` / ``fast`` use the first window; ``windows`` times all ``windows`` in one call
    against one call per window (both ``method="lam"``)."""
    device = torch.device(device)
    w0 = tuple(windows[0])
    exact = LocalAttributor(model, steps=steps, method="lam", device=device, precision=precision)
    fast = LocalAttributor(model, steps=fast_nodes, method="gausslegendre", device=device, precision=precision)
    out: dict[str, Any] = {"image_shape": list(image.shape), "windows": [list(w) for w in windows], "steps": steps,
                           "fast_rule": f"gausslegendre/{fast_nodes}", "precision": precision, "device": str(device),
                           "cases": {}}
    for att in (exact, fast):  # warm-up (allocator, kernels, memory probe) before any clock
        att.attribute([image], [[w0]])
    t, mem, res = _timed(lambda: exact.attribute([image], [[w0]])[0][0], device, repeat)
    ref = res.attribution
    if "lam" in cases:
        out["cases"]["lam"] = {"seconds": t, "peak_bytes": mem, **_agreement(ref, ref)}
    if "naive" in cases:
        t, mem, m = _timed(lambda: naive_lam(model, image, w0, steps, device=device), device, repeat)
        out["cases"]["naive"] = {"seconds": t, "peak_bytes": mem, **_agreement(m, ref)}
    if "fast" in cases:
        t, mem, res = _timed(lambda: fast.attribute([image], [[w0]])[0][0], device, repeat)
        out["cases"]["fast"] = {"seconds": t, "peak_bytes": mem, **_agreement(res.attribution, ref)}
    if "windows" in cases:
        t_one, mem_one, together = _timed(lambda: exact.attribute([image], [list(windows)])[0], device, repeat)
        t_sep, mem_sep, apart = _timed(lambda: [exact.attribute([image], [[w]])[0][0] for w in windows], device,
                                       repeat)
        r = min(pearson(a.attribution, b.attribution) for a, b in zip(together, apart))
        out["cases"]["windows_one_call"] = {"seconds": t_one, "peak_bytes": mem_one, "windows": len(windows),
                                            "min_pearson_r_vs_single": r}
        out["cases"]["windows_single_calls"] = {"seconds": t_sep, "peak_bytes": mem_sep, "windows": len(windows)}
    base = out["cases"].get("naive", {}).get("seconds")
    for name, c in out["cases"].items():
        if base and not name.startswith("windows"):  # the K-window cases compare with each other
            c["speedup_vs_naive"] = base / c["seconds"]
    if "windows" in cases:
        one, sep = out["cases"]["windows_one_call"], out["cases"]["windows_single_calls"]
        one["speedup_vs_single_calls"] = sep["seconds"] / one["seconds"]
    return out


# inputs --------------------------------------------------------------------------------------------
def bench_inputs(size: int | None, images: int, scale: int, data: str | Path | None = None,
                 channels: int = 3) -> list[tuple[str, torch.Tensor]]:
    """(name, LR input) pairs from Set14: HR centre-cropped to ``size``·scale (``None``: full images),
    bicubic ÷scale; scikit-image's photographs when Set14 is not there."""
    from faig_fast.data.degradations import bicubic_down
    from faig_fast.data.images import demo_images, list_images, read_image

    folder = Path(data) if data is not None else data_root() / "Set14"
    if folder.is_dir():
        hr = [(p.name, read_image(p, channels)) for p in list_images(folder)[:images]]
    else:
        hr = demo_images()[:images]
    out = []
    for name, img in hr:
        if size:
            h, w = img.shape[-2:]
            s = size * scale
            if min(h, w) >= s:
                top, left = (h - s) // 2, (w - s) // 2
                img = img[:, top:top + s, left:left + s]
        out.append((name, bicubic_down(img, scale)))
    return out


def spread_windows(out_hw: tuple[int, int], k: int, size: int) -> list[Window]:
    """``k`` windows of ``size`` on a regular grid over the output (deterministic, for benchmarks)."""
    h, w = out_hw
    n = math.ceil(math.sqrt(k))
    rows = np.linspace(0, h - size, n).astype(int)
    cols = np.linspace(0, w - size, n).astype(int)
    return [(int(r), int(c), size) for r in rows for c in cols][:k]


def pair_model(pair: str, which: str = "target") -> nn.Module:
    from faig_fast.models import load_model

    folder = Path(pair) if Path(pair).is_dir() else shipped_pair_dir(pair)
    return load_model(folder / f"{which}.safetensors")


def run_lam_benchmarks(*, pair: str = "msrresnet_small", size: int = 64, full_images: int = 1, windows: int = 16,
                       window_size: int = 16, steps: int = 50, fast_nodes: int = FAST_LAM_NODES,
                       device: str | None = None, precision: str = "fp32", repeat: int = 1,
                       out: str | Path | None = None) -> Path:
    """:func:`bench_lam` on the pair's target at ``size``×``size`` LR and on ``full_images`` full Set14
    images; JSON written to ``out`` (default ``benchmarks/results/lam-bench-<device>.json``)."""
    from faig_fast.apps.bench import device_name

    dev = torch.device(device or "cpu")
    model = pair_model(pair)
    scale = getattr(model, "upscale", 1)
    doc: dict[str, Any] = {"pair": pair, "device": device_name(dev), "torch": torch.__version__,
                           "torch_threads": torch.get_num_threads(), "runs": []}
    inputs = [("crop", *bench_inputs(size, 1, scale)[0])] + [("full", n, x) for n, x in bench_inputs(None, full_images, scale)]
    for kind, name, lr in inputs:
        out_hw = (lr.shape[-2] * scale, lr.shape[-1] * scale)
        ws = spread_windows(out_hw, windows, window_size)
        res = bench_lam(model, lr, ws, steps=steps, fast_nodes=fast_nodes, device=dev, precision=precision,
                        repeat=repeat)
        doc["runs"].append({"input": kind, "image": name, **res})
    path = Path(out) if out else results_dir() / f"lam-bench-{dev.type}.json"
    atomic_write_json(path, doc)
    return path


# the node-count study ------------------------------------------------------------------------------
def lam_study(model: nn.Module, inputs: Sequence[tuple[str, torch.Tensor]], *, windows: int = 4,
              window_size: int = 16, reference_steps: int = 400, lam_steps: int = 50,
              nodes: Sequence[int] = (4, 6, 8, 12, 16, 24, 32, 48, 64), device: str | None = None,
              precision: str = "fp32", out: str | Path | None = None) -> dict:
    """The fewest Gauss–Legendre nodes that match a converged map (``method="lam"`` at
    ``reference_steps``): mean Pearson r over windows ≥ 0.999 and mean |DI − DI_converged| no larger
    than the reference's ``lam_steps`` (or ≤ 1 % of the converged DI).  Writes JSON to ``out``."""
    from faig_fast.apps.lam_runs import choose_windows

    def run(method: str, steps: int, lr: torch.Tensor, ws: list[Window]) -> list:
        att = LocalAttributor(model, steps=steps, method=method, device=device, precision=precision)
        return att.attribute([lr], [ws])[0]

    per_image, rows = [], {n: {"r": [], "ddi": []} for n in nodes}
    lam_ddi, conv_di = [], []
    for name, lr in inputs:
        probe = LocalAttributor(model, steps=1, device=device, precision=precision)
        ws = choose_windows(lr, probe.output_shape(lr, name)[-2:], windows, window_size, 0, name)
        conv = run("lam", reference_steps, lr, ws)
        conv_di += [c.diffusion_index for c in conv]
        lam_ddi += [abs(a.diffusion_index - c.diffusion_index) for a, c in zip(run("lam", lam_steps, lr, ws), conv)]
        for n in nodes:
            for a, c in zip(run("gausslegendre", n, lr, ws), conv):
                rows[n]["r"].append(pearson(a.attribution, c.attribution))
                rows[n]["ddi"].append(abs(a.diffusion_index - c.diffusion_index))
        per_image.append({"image": name, "windows": [list(w) for w in ws], "converged_di": [c.diffusion_index for c in conv]})
    tol_lam = float(np.mean(lam_ddi))
    tol = max(tol_lam, 0.01 * float(np.mean(conv_di)))
    table = [{"nodes": n, "mean_pearson_r": float(np.mean(rows[n]["r"])), "min_pearson_r": float(np.min(rows[n]["r"])),
              "mean_abs_di_difference": float(np.mean(rows[n]["ddi"]))} for n in nodes]
    fewest = next((t["nodes"] for t in table if t["mean_pearson_r"] >= 0.999 and t["mean_abs_di_difference"] <= tol),
                  None)
    doc = {"reference": f"lam/{reference_steps}", "lam_steps": lam_steps, "lam_mean_abs_di_difference": tol_lam,
           "di_tolerance": tol, "rows": table, "fewest_gl_nodes": fewest, "images": per_image,
           "windows_per_image": windows, "window_size": window_size, "precision": precision}
    if out is not None:
        atomic_write_json(out, doc)
    return doc


def lam_study_markdown(doc: dict) -> str:
    """The study's table: nodes, Pearson r against the converged map, DI difference."""
    lines = [f"Gauss–Legendre nodes vs {doc['reference']} (DI tolerance {doc['di_tolerance']:.3f}: "
             f"lam/{doc['lam_steps']} is off by {doc['lam_mean_abs_di_difference']:.3f} on average)", "",
             "| nodes | mean r | min r | mean abs DI difference |", "|---:|---:|---:|---:|"]
    lines += [f"| {t['nodes']} | {t['mean_pearson_r']:.5f} | {t['min_pearson_r']:.5f} | "
              f"{t['mean_abs_di_difference']:.3f} |" for t in doc["rows"]]
    lines += ["", f"fewest nodes meeting both: {doc['fewest_gl_nodes']}"]
    return "\n".join(lines) + "\n"


def run_lam_study(*, pair: str = "msrresnet_small", size: int | None = 64, images: int = 4, windows: int = 4,
                  window_size: int = 16, reference_steps: int = 400, device: str | None = None,
                  out: str | Path | None = None) -> Path:
    """:func:`lam_study` on the pair's target over ``images`` Set14 images (LR ``size``×``size`` crops;
    ``None``: full images); JSON to ``out`` (default ``benchmarks/results/study-lam-<pair>.json``)."""
    model = pair_model(pair)
    inputs = bench_inputs(size, images, getattr(model, "upscale", 1))
    path = Path(out) if out else results_dir() / f"study-lam-{Path(pair).name}.json"
    doc = lam_study(model, inputs, windows=windows, window_size=window_size, reference_steps=reference_steps,
                    device=device)
    doc.update(pair=pair, size=size, torch=torch.__version__)
    atomic_write_json(path, doc)
    print(lam_study_markdown(doc))
    return path
