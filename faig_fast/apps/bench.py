"""``faig bench``: the engine against the naive loop, side by side in one run, written as JSON.

Every case runs in its own fresh Python process, one after another, so peak memory (RSS on CPU,
``max_memory_allocated`` on CUDA) belongs to that case alone and no two cases share the cores.
Achieved TFLOP/s uses one FLOP count for all cases: forward+backward of the model on the
benchmark images × the naive loop's number of steps (the *useful* work of the paper's Eq. 6).
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

from faig_fast.utils.device import sync
from faig_fast.core.attribution import jaccard
from faig_fast.core.quadrature import FAST_GL_NODES
from faig_fast.utils.io import atomic_write_json
from faig_fast.utils.paths import data_root, results_dir, shipped_pair_dir

CASES = ("naive", "loop", "vmap", "linear", "loop-gl", "reduce-torch", "reduce-cpp", "reduce-triton",
         "reduce-cuda")


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
    """A baseline and a nearby target: the shipped trained pair when there is one, else a perturbed copy."""
    from faig_fast.models import create_model, load_model

    shipped = shipped_pair_dir(f"{arch}_{preset}")
    if (shipped / "baseline.safetensors").exists():
        return load_model(shipped / "baseline.safetensors"), load_model(shipped / "target.safetensors"), str(shipped)
    torch.manual_seed(seed)
    a = create_model(arch, preset=preset, upscale=2)
    b = create_model(arch, preset=preset, upscale=2)
    b.load_state_dict({k: v + 0.02 * v.std() * torch.randn_like(v) for k, v in a.state_dict().items()})
    return a.eval(), b.eval(), "random-init pair (seed 0), target = baseline + 2% noise"


def _images(size: int, n: int):
    from faig_fast.data import DegradedImageDataset, demo_images

    src = data_root() / "Set14"
    images = src if src.exists() else demo_images()
    ds = DegradedImageDataset(images, ("blur", "noise"), scale=2, seed=0, crop=2 * size if size else None)
    return [ds[i] for i in range(min(n, len(ds)))], ("Set14" if src.exists() else "skimage demo images")


def flop_count(model: torch.nn.Module, lq: torch.Tensor, gt: torch.Tensor) -> int:
    """FLOPs of one forward+backward of L = Σ(F(x) − gt)² w.r.t. the parameters."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss = ((model(lq[None]) - gt[None]) ** 2).sum()
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _worker(cfg: dict) -> dict:
    """Run one case in this process and describe it."""
    from faig_fast.core.api import attribute
    from faig_fast.core.reference import reference_attribute

    from faig_fast.ops.reduction import available_backends

    available_backends()  # any extension build happens before the clock starts
    device = torch.device(cfg["device"])
    case = cfg["case"]
    a, b, pair_desc = _pair(cfg["arch"], cfg["preset"])
    items, source = _images(cfg["size"], cfg["images"])
    out: dict = {"case": case}
    if case.startswith("reduce-"):
        from faig_fast.ops.reduction import filter_abs_sum

        backend = case.split("-", 1)[1]
        from faig_fast.core.filters import FilterIndex

        index = FilterIndex.from_model(b)
        p = sum(l.num_filters * l.kk for l in index.layers)
        g = torch.Generator().manual_seed(0)
        delta = torch.randn(p, generator=g).to(device)
        grads = torch.randn(4, p, generator=g).to(device)
        filter_abs_sum(delta, grads, 9, backend=backend)
        times = []
        for _ in range(max(3, cfg["repeat"])):
            sync(device)
            t0 = time.perf_counter()
            filter_abs_sum(delta, grads, 9, backend=backend)
            sync(device)
            times.append(time.perf_counter() - t0)
        out.update(seconds=min(times), elements=4 * p, gbytes_per_s=4 * p * 2 * 4 / min(times) / 1e9)
        return out
    method, steps = cfg["method"], cfg["steps"]
    kwargs: dict = {}
    if case == "loop-gl":
        method, steps = "gausslegendre", cfg["gl_nodes"]
    if case == "naive":
        run = lambda: reference_attribute(a.to(device), b.to(device),  # noqa: E731
                                          [(x.to(device), y.to(device), l) for x, y, l in items], steps, method)
    else:
        strategy = case.split("-")[0]
        run = lambda: attribute(a, b, items, steps=steps, method=method, strategy=strategy,  # noqa: E731
                                device=device, **kwargs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, result = [], None
    for _ in range(cfg["repeat"]):
        sync(device)
        t0 = time.perf_counter()
        result = run()
        sync(device)
        times.append(time.perf_counter() - t0)
    flops = sum(flop_count(b.to(device), x.to(device), y.to(device)) for x, y, _ in items) * cfg["steps"]
    out.update(
        seconds=min(times), all_seconds=times, method=method, steps=steps, pair=pair_desc, source=source,
        images_per_s=len(items) / min(times), useful_tflops=flops / 1e12,
        achieved_tflop_s=flops / min(times) / 1e12,
        peak_memory_mb=(torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20,
        top1={l: result.top(l, 0.01).tolist() for l in result.labels},
        lq_sizes=[list(x.shape[-2:]) for x, _, _ in items],
    )
    return out



def run_benchmarks(*, arch: str = "msrresnet", preset: str = "paper", size: int = 32, images: int = 2,
                   steps: int = 100, method: str = "riemann_left", cases: list[str] | None = None,
                   device: str | None = None, repeat: int = 1, gl_nodes: int = FAST_GL_NODES, out: str | None = None) -> Path:
    """Run every case in a fresh process, one at a time; write and return the JSON path."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if cases is None:
        cases = ["naive", "loop", "loop-gl", "reduce-torch", "reduce-cpp"]
        if dev.type == "cuda":
            cases = ["naive", "loop", "vmap", "linear", "loop-gl", "reduce-torch", "reduce-triton", "reduce-cuda"]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        from faig_fast.errors import InvalidInputError

        raise InvalidInputError(f"unknown bench case(s) {unknown}; choose from {list(CASES)}")
    results = []
    for case in cases:
        cfg = dict(case=case, arch=arch, preset=preset, size=size, images=images, steps=steps, method=method,
                   device=str(dev), repeat=repeat, gl_nodes=gl_nodes)
        proc = subprocess.run([sys.executable, "-m", "faig_fast.apps.bench", json.dumps(cfg)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            results.append({"case": case, "error": proc.stderr.strip().splitlines()[-1:]})
            print(f"{case:>14}: failed: {results[-1]['error']}", file=sys.stderr)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{case:>14}: {r['seconds']:.3f} s", file=sys.stderr)
    _compare(results)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    doc = {
        "device": device_name(dev), "device_type": dev.type, "torch": torch.__version__,
        "triton": triton_version, "python": platform.python_version(),
        "arch": arch, "preset": preset, "lq_crop": size or "full", "images": images, "steps": steps,
        "method": method, "gl_nodes": gl_nodes, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results,
    }
    path = Path(out) if out else results_dir() / f"{dev.type}-{arch}-{preset}-{size or 'full'}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)
    return path


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
