"""``faig bench``: the engine against the naive loop, side by side in one run, written as JSON.

Every case runs in its own fresh Python process, one after another, so peak memory (RSS on CPU,
``max_memory_allocated`` on CUDA) belongs to that case alone and no two cases share the cores.
Achieved TFLOP/s counts the useful work of each case's own rule: forward+backward of the model on
the benchmark images × that rule's number of nodes (what the paper's Eq. 6 needs, whatever extra
work a strategy does).  Each case also gets its roofline (:mod:`faig_fast.apps.roofline`): the minimum DRAM bytes of that
work, the device's peak FLOP rate and bandwidth, and the fractions achieved.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from faig_fast.apps.roofline import device_peaks, roofline, workload_counts
from faig_fast.utils.device import sync
from faig_fast.core.attribution import jaccard
from faig_fast.core.quadrature import FAST_GL_NODES
from faig_fast.utils.io import atomic_write_json
from faig_fast.utils.paths import data_root, results_dir, shipped_pair_dir

#: engine strategies, ``loop-gl`` (the loop with Gauss–Legendre nodes), ``dataset`` (the path ``faig attribute``
#: takes: :func:`faig_fast.attribute`'s one run loop with the default strategy) and the reductions alone
CASES = ("naive", "loop", "vmap", "linear", "persample", "loop-gl", "dataset", "reduce-torch", "reduce-cpp",
         "reduce-triton", "reduce-cuda")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def _pair(arch: str, preset: str, seed: int = 0):
    """A baseline and a nearby target: the shipped trained pair when there is one, else a perturbed copy.

    The random pair is drawn inside ``torch.random.fork_rng``: the caller's global RNG is left as it was.
    """
    from faig_fast.models import create_model, load_model

    shipped = shipped_pair_dir(f"{arch}_{preset}")
    if (shipped / "baseline.safetensors").exists():
        return load_model(shipped / "baseline.safetensors"), load_model(shipped / "target.safetensors"), str(shipped)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        a = create_model(arch, preset=preset, upscale=2)
        b = create_model(arch, preset=preset, upscale=2)
        g = torch.Generator().manual_seed(seed + 1)
        b.load_state_dict({k: v + 0.02 * v.std() * torch.randn(v.shape, generator=g, dtype=v.dtype)
                           if v.is_floating_point() else v for k, v in a.state_dict().items()})
    return a.eval(), b.eval(), f"random-init pair (seed {seed}), target = baseline + 2% noise"


def _images(size: int, n: int):
    from faig_fast.data import DegradedImageDataset, demo_images

    src = data_root() / "Set14"
    images = src if src.exists() else demo_images()
    ds = DegradedImageDataset(images, ("blur", "noise"), scale=2, seed=0, crop=2 * size if size else None)
    return [ds[i] for i in range(min(n, len(ds)))], ("Set14" if src.exists() else "skimage demo images")


def flop_count(model: torch.nn.Module, lq: torch.Tensor, gt: torch.Tensor) -> int:
    """FLOPs of one forward+backward of L = Σ(F(x) − gt)² w.r.t. the parameters."""
    return workload_counts(model, lq, gt)["flops"]


def workload(model: torch.nn.Module, items: list, steps: int, device: torch.device, precision: str = "fp32") -> dict:
    """Useful FLOPs and minimum DRAM bytes of ``steps`` nodes on every image (see :mod:`.roofline`)."""
    model = model.to(device)
    counts = [workload_counts(model, x.to(device), y.to(device), precision) for x, y, _ in items]
    return {"flops": sum(c["flops"] for c in counts) * steps,
            "min_dram_bytes": sum(c["min_dram_bytes"] for c in counts) * steps,
            "per_pass": counts[0] if counts else {}}


def _reduce_case(backend: str, b: torch.nn.Module, device: torch.device, repeat: int) -> dict:
    """Time one per-filter reduction backend on the model's conv filters for 4 images."""
    from faig_fast.core.filters import FilterIndex
    from faig_fast.ops.reduction import filter_abs_sum

    index = FilterIndex.from_model(b)
    p = sum(l.num_filters * l.kk for l in index.layers)
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(p, generator=g).to(device)
    grads = torch.randn(4, p, generator=g).to(device)
    filter_abs_sum(delta, grads, 9, backend=backend)
    times = []
    for _ in range(max(3, repeat)):
        sync(device)
        t0 = time.perf_counter()
        filter_abs_sum(delta, grads, 9, backend=backend)
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"seconds": min(times), "elements": 4 * p, "gbytes_per_s": 4 * p * 2 * 4 / min(times) / 1e9}


def _worker(cfg: dict) -> dict:
    """Run one case in this process and describe it."""
    from faig_fast.core.api import attribute
    from faig_fast.core.reference import reference_attribute
    from faig_fast.ops.reduction import available_backends

    available_backends(build=True)  # any extension build happens before the clock starts
    device = torch.device(cfg["device"])
    case = cfg["case"]
    a, b, pair_desc = _pair(cfg["arch"], cfg["preset"])
    if case.startswith("reduce-"):
        return {"case": case, **_reduce_case(case.split("-", 1)[1], b, device, cfg["repeat"])}
    items, source = _images(cfg["size"], cfg["images"])
    method, steps = cfg["method"], cfg["steps"]
    precision = "fp32" if case == "naive" else cfg.get("precision", "fp32")
    if case == "loop-gl":
        method, steps = "gausslegendre", cfg["gl_nodes"]
    if case == "dataset":
        run = lambda: attribute(a, b, items, steps=steps, method=method, device=device,  # noqa: E731
                                precision=precision)
    elif case == "naive":
        run = lambda: reference_attribute(a.to(device), b.to(device),  # noqa: E731
                                          [(x.to(device), y.to(device), l) for x, y, l in items], steps, method)
    else:
        run = lambda: attribute(a, b, items, steps=steps, method=method, strategy=case.split("-")[0],  # noqa: E731
                                device=device, precision=precision)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, result = [], None
    for _ in range(cfg["repeat"]):
        sync(device)
        t0 = time.perf_counter()
        result = run()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    work = workload(b, items, steps, device, precision)
    return {"case": case, "seconds": min(times), "all_seconds": times, "method": method, "steps": steps,
            "precision": precision, "pair": pair_desc, "source": source, "images_per_s": len(items) / min(times),
            "useful_tflops": work["flops"] / 1e12, "min_dram_bytes": work["min_dram_bytes"],
            "achieved_tflop_s": work["flops"] / min(times) / 1e12, "peak_memory_mb": peak,
            "top1": {l: result.top(l, 0.01).tolist() for l in result.labels},
            "lq_sizes": [list(x.shape[-2:]) for x, _, _ in items]}


def run_benchmarks(*, arch: str = "msrresnet", preset: str = "paper", size: int = 32, images: int = 2,
                   steps: int = 100, method: str = "riemann_left", cases: list[str] | None = None,
                   device: str | None = None, repeat: int = 1, gl_nodes: int = FAST_GL_NODES,
                   precision: str = "fp32", out: str | None = None) -> Path:
    """Run every case in a fresh process, one at a time; write the JSON, print the table, return the path."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cases is None:
        cases = ["naive", "loop", "loop-gl", "dataset", "reduce-torch", "reduce-cpp"]
        if dev.type == "cuda":
            cases = ["naive", "loop", "vmap", "linear", "persample", "loop-gl", "dataset", "reduce-torch", "reduce-triton", "reduce-cuda"]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        from faig_fast.errors import InvalidInputError

        raise InvalidInputError(f"unknown bench case(s) {unknown}; choose from {list(CASES)}")
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for _ in range(max(1, repeat)):  # round robin: a machine whose speed drifts slows every case alike
        for case in cases:
            cfg = dict(case=case, arch=arch, preset=preset, size=size, images=images, steps=steps, method=method,
                       device=str(dev), repeat=1, gl_nodes=gl_nodes, precision=precision)
            runs[case].append(_run_case(cfg))
    results = [_best_of(rs) for rs in runs.values()]
    _compare(results)
    peaks = {p: device_peaks(dev, p) for p in sorted({"fp32", precision})}  # measured when no case runs
    for r in results:
        if "min_dram_bytes" in r:
            r["roofline"] = roofline(r["useful_tflops"] * 1e12, r["min_dram_bytes"], r["seconds"],
                                     peaks["fp32" if r["case"] == "naive" else precision])
    doc = {
        "device": device_name(dev), "device_type": dev.type, "torch": torch.__version__,
        "triton": _triton_version(), "python": platform.python_version(),
        "arch": arch, "preset": preset, "lq_crop": size or "full", "images": images, "steps": steps,
        "method": method, "gl_nodes": gl_nodes, "precision": precision, "repeat": repeat, "peaks": peaks,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results,
    }
    name = f"{dev.type}-{arch}-{preset}-{size or 'full'}-{precision}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path = Path(out) if out else results_dir() / name
    atomic_write_json(path, doc)
    print(bench_table(results))
    return path


def _best_of(runs: list[dict]) -> dict:
    """The fastest of a case's repeated runs, with every run's seconds and the largest peak memory."""
    ok = [r for r in runs if "seconds" in r]
    if not ok:
        return runs[0]
    best = dict(min(ok, key=lambda r: r["seconds"]))
    best["all_seconds"] = [r["seconds"] for r in ok]
    if "peak_memory_mb" in best:
        best["peak_memory_mb"] = max(r["peak_memory_mb"] for r in ok)
    return best


def _run_case(cfg: dict) -> dict:
    """One case in a fresh Python process (its own peak memory, no shared cores)."""
    proc = subprocess.run([sys.executable, "-m", "faig_fast.apps.bench", json.dumps(cfg)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        r = {"case": cfg["case"], "error": proc.stderr.strip().splitlines()[-1:]}
        print(f"{cfg['case']:>14}: failed: {r['error']}", file=sys.stderr)
        return r
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{cfg['case']:>14}: {r['seconds']:.3f} s", file=sys.stderr)
    return r


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def bench_table(results: list[dict]) -> str:
    """Markdown table: seconds, speed-up, achieved TFLOP/s and GB/s with their fractions of the peaks."""
    lines = ["| case | s | speed-up | TFLOP/s | % peak FLOP | GB/s (min traffic) | % peak BW | % roofline | "
             "peak MiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "seconds" not in r:
            lines.append(f"| {r.get('case')} | failed: {r.get('error')} | | | | | | | |")
            continue
        rl = r.get("roofline", {})
        sp = r.get("speedup_vs_naive")
        lines.append(
            f"| {r['case']} | {r['seconds']:.3f} | {'' if sp is None else f'{sp:.1f}x'} | "
            f"{rl.get('achieved_tflop_s', float('nan')):.3f} | {_pct(rl.get('fraction_of_peak_flops'))} | "
            f"{rl.get('achieved_gb_s', float('nan')):.1f} | {_pct(rl.get('fraction_of_peak_bw'))} | "
            f"{_pct(rl.get('fraction_of_roofline'))} | {r.get('peak_memory_mb', float('nan')):.0f} |")
    return "\n".join(lines)


def _compare(results: list[dict]) -> None:
    """Speed-up and top-1% Jaccard of every case against the naive loop."""
    naive = next((r for r in results if r.get("case") == "naive" and "seconds" in r), None)
    if naive is None:
        return
    for r in results:
        if "top1" in r:
            r["speedup_vs_naive"] = naive["seconds"] / r["seconds"]
            r["jaccard_top1_vs_naive"] = {l: jaccard(r["top1"][l], naive["top1"][l]) for l in naive["top1"]}
    for r in results:
        r.pop("top1", None)


if __name__ == "__main__":
    print(json.dumps(_worker(json.loads(sys.argv[1]))))
