"""``make gpu-check``: everything worth measuring on a CUDA machine, in one command and under 8 minutes.

``python3 -m faig_fast.apps.gpu_check`` (from the source tree, no venv, no download):

(a) the CUDA tests (``tests/test_cuda.py``: every strategy × precision × reduction backend against the
    fp64 CPU reference, the ``persample`` CUDA-graph replay at ≥ 16 nodes, Triton compiled for real);
(b) the engine against the naive loop at the same rule on MSRResNet 16×64 ×2: 28 Set14 crops of 64×64 LR
    (14 images × blur, noise) and full Set14, Riemann-left N=100 and Gauss–Legendre 8, fp32 / tf32 / bf16:
    seconds, speed-up, achieved TFLOP/s and fraction of the dense peak, DRAM bandwidth against the
    bound (:mod:`faig_fast.apps.roofline`), peak memory, top-1% Jaccard against fp64; seconds per
    strategy; training throughput of the ``paper`` preset; LAM (``faig_fast.lam``) against its naive
    per-step loop on a 64×64 LR crop and a full Set14 image, 16 windows in one call against 16 calls;
(c) ``benchmarks/results/gpu-<device>-<date>.json`` and ``.md``, and the table on stdout.

The naive loop runs in fp32 (the authors' loop has no precision switch).  On full Set14 at N=100 it
is timed on ``naive_full_steps`` steps of the same loop and extrapolated linearly (each step is one
forward+backward per image, so the per-step cost is constant); such rows say ``"extrapolated"``.
Jobs run in priority order against a time budget; a job whose estimate does not fit is recorded as
skipped, never silently dropped.  Without CUDA the same code runs a tiny CPU dry run (tiny model,
2 images, 2 steps) that checks the wiring, and exits 0.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from faig_fast.apps.bench import _pair, device_name, workload
from faig_fast.apps.roofline import device_peaks, roofline
from faig_fast.core.attribution import jaccard
from faig_fast.utils.device import sync
from faig_fast.utils.io import atomic_write_json, atomic_write_text
from faig_fast.utils.paths import data_root, results_dir

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class CheckConfig:
    """What one gpu-check run measures."""

    device: str = "cuda"
    arch: str = "msrresnet"
    preset: str = "paper"
    crop_lq: int = 64
    images: int = 14
    full: bool = True
    rules: tuple = (("riemann_left", 100), ("gausslegendre", 8))
    precisions: tuple = ("fp32", "tf32", "bf16")
    strategy: str = "tune"
    strategies: tuple = ("loop", "vmap", "linear", "persample")
    naive_full_steps: int = 10
    train_iters: int = 30
    train_images: int | None = None  # None: every image of SunHays80
    budget_s: float = 450.0
    tests: tuple = ("tests/test_cuda.py",)
    tests_timeout_s: float = 180.0
    lam_pair: str = "msrresnet_small"
    lam_size: int = 64           # LR crop of the first LAM input; then lam_full_images full Set14 images
    lam_full_images: int = 1
    lam_windows: int = 16


def dry_run_config() -> CheckConfig:
    """The CPU dry run: same code path, tiny model, 2 images (1 × blur, noise), 2 steps."""
    return CheckConfig(device="cpu", preset="tiny", crop_lq=8, images=1, full=False,
                       rules=(("riemann_left", 2), ("gausslegendre", 2)), precisions=("fp32", "bf16"),
                       strategy="loop", strategies=("loop",), naive_full_steps=1, train_iters=2, train_images=2,
                       budget_s=60.0, tests=(), tests_timeout_s=60.0, lam_pair="msrresnet_tiny", lam_size=12,
                       lam_full_images=0, lam_windows=2)


class Budget:
    """Wall-clock budget: jobs whose estimate does not fit are skipped and recorded as such."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def fits(self, estimate: float | None) -> bool:
        return self.left() > (estimate or 0.0)


# --------------------------------------------------------------------------- (a) tests

def run_tests(cfg: CheckConfig) -> dict:
    """The CUDA test files under pytest in a subprocess; the summary line and the return code."""
    files = [f for f in cfg.tests if (REPO / f).is_file()]
    if not cfg.tests:
        return {"skipped": "dry run: no tests"}
    if not files:
        return {"skipped": f"{list(cfg.tests)} not found under {REPO} (run from the source tree)"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                              cwd=REPO, capture_output=True, text=True, timeout=cfg.tests_timeout_s)
    except subprocess.TimeoutExpired:
        return {"files": files, "returncode": None, "summary": f"timed out after {cfg.tests_timeout_s:.0f} s"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    failed = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
    return {"files": files, "returncode": proc.returncode, "summary": lines[-1] if lines else proc.stderr[-300:],
            "failed": failed[:50], "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- (b) workloads

def _items(cfg: CheckConfig, crop: bool) -> tuple[list, str]:
    """Set14 (or the bundled demo photographs when Set14 is absent) × blur, noise; LR crops or full."""
    from faig_fast.data import DegradedImageDataset, demo_images

    src = data_root() / "Set14"
    images = src if src.exists() else demo_images()
    ds = DegradedImageDataset(images, ("blur", "noise"), scale=2, seed=0, crop=2 * cfg.crop_lq if crop else None)
    names = ds.names[: cfg.images]
    items = [ds[i] for i in range(len(ds)) if ds.item_name(i).split("/")[0] in names]
    label = "Set14" if src.exists() else "skimage demo images (Set14 not found)"
    return items, f"{label}, {len(items)} items, " + (f"{cfg.crop_lq}x{cfg.crop_lq} LR crops" if crop else "full")


def _timed(fn: Callable, device: torch.device) -> tuple[object, float, float]:
    """fn() with its seconds and peak memory (MiB; CUDA only, else NaN)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return out, sec, peak


def _top(result, fraction: float = 0.01) -> dict[str, list[int]]:
    return {l: result.top(l, fraction).tolist() for l in result.labels}


def _min_jaccard(a: dict, b: dict | None) -> float | None:
    return None if b is None else min(jaccard(a[l], b[l]) for l in b)


class Runner:
    """Runs the jobs of one workload against the budget and collects rows."""

    def __init__(self, cfg: CheckConfig, pair, budget: Budget, peaks: dict):
        self.cfg, (self.a, self.b, self.pair_desc), self.budget, self.peaks = cfg, pair, budget, peaks
        self.device = torch.device(cfg.device)
        self.rows: list[dict] = []
        self.rate: dict[str, float] = {}  # seconds per TFLOP observed, per (kind, precision)

    def estimate(self, key: str, tflop: float) -> float | None:
        return self.rate[key] * tflop if key in self.rate else None

    def job(self, row: dict, tflop: float, key: str, fn: Callable, scale: float = 1.0) -> dict | None:
        """Run ``fn`` (``tflop`` of work) if its estimate fits the budget; record the row.

        ``scale`` > 1 marks a partial run whose seconds are extrapolated by that factor.
        """
        est = self.estimate(key, tflop)
        if not self.budget.fits(est):
            why = f"estimate {est:.0f} s" if est is not None else "budget spent"
            row.update(skipped=f"over budget ({why}, {self.budget.left():.0f} s left)")
            self.rows.append(row)
            return None
        try:
            result, sec, peak = _timed(fn, self.device)
        except Exception as exc:  # noqa: BLE001 - an OOM or a strategy that cannot run here is a finding
            row.update(error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            self.rows.append(row)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None
        self.rate[key] = sec / max(tflop, 1e-12)  # tflop: the work this call runs
        row.update(seconds=sec * scale, peak_memory_mib=peak)
        if scale != 1.0:
            row.update(extrapolated=f"timed {sec:.2f} s on 1/{scale:g} of the steps, scaled linearly")
        self.rows.append(row)
        return {"result": result, "seconds": sec * scale}

    def attribute(self, items: list, method: str, steps: int, precision: str, strategy: str):
        from faig_fast.core.api import attribute

        return attribute(self.a, self.b, items, steps=steps, method=method, device=self.device,
                         strategy=strategy, precision=precision)

    def naive(self, items: list, method: str, steps: int):
        from faig_fast.core.reference import reference_attribute

        dev_items = [(x.to(self.device), y.to(self.device), l) for x, y, l in items]
        return reference_attribute(self.a.to(self.device), self.b.to(self.device), dev_items, steps, method)


def _rule_jobs(run: Runner, items: list, workload_name: str, method: str, steps: int, naive_scale: float) -> None:
    """The engine at every precision, the naive loop, then the fp64 reference, for one workload and rule.

    The fp64 reference runs last (it is the dearest and the first to be skipped when time runs out);
    the Jaccard columns are filled in afterwards.
    """
    cfg = run.cfg
    base = {"workload": workload_name, "rule": f"{method}/{steps}"}
    work = {p: workload(run.b, items, steps, run.device, p) for p in {"fp32", *cfg.precisions}}
    tflop = work["fp32"]["flops"] / 1e12
    tops: list[tuple[dict, dict]] = []
    engine_rows = []
    for p in cfg.precisions:
        row = {**base, "case": "engine", "precision": p, "strategy": cfg.strategy}
        out = run.job(row, tflop, f"engine-{p}", lambda p=p: run.attribute(items, method, steps, p, cfg.strategy))
        if out is not None:
            res = out["result"]
            row.update(strategy_used=res.meta.get("strategy"),
                       roofline=roofline(work[p]["flops"], work[p]["min_dram_bytes"], out["seconds"], run.peaks[p]))
            tops.append((row, _top(res)))
            engine_rows.append(row)
    naive_steps = max(1, round(steps / naive_scale))
    naive = run.job({**base, "case": "naive", "precision": "fp32", "steps_run": naive_steps}, tflop / naive_scale,
                    "naive", lambda: run.naive(items, method if naive_scale == 1 else "riemann_left", naive_steps),
                    scale=naive_scale)
    if naive is not None:
        for row in engine_rows:
            row["speedup_vs_naive"] = naive["seconds"] / row["seconds"]
        if naive_scale == 1:
            tops.append((run.rows[-1], _top(naive["result"])))
    ref = run.job({**base, "case": "engine", "precision": "fp64", "strategy": "loop"}, tflop, "fp64",
                  lambda: run.attribute(items, method, steps, "fp64", "loop"))
    ref_top = _top(ref["result"]) if ref else None
    for row, top in tops:
        row["jaccard_top1_vs_fp64"] = _min_jaccard(top, ref_top)


def _strategy_jobs(run: Runner, items: list, workload_name: str) -> None:
    """Seconds of each engine strategy at the first rule and the first reduced precision."""
    method, steps = run.cfg.rules[0]
    p = run.cfg.precisions[1] if len(run.cfg.precisions) > 1 else run.cfg.precisions[0]
    tflop = workload(run.b, items, steps, run.device, p)["flops"] / 1e12
    for s in run.cfg.strategies:
        row = {"workload": workload_name, "rule": f"{method}/{steps}", "case": "strategy", "precision": p,
               "strategy": s}
        out = run.job(row, tflop, f"engine-{p}", lambda s=s: run.attribute(items, method, steps, p, s))
        if out is not None:
            row["strategy_used"] = out["result"].meta.get("strategy")


def _warm_up(run: Runner, items: list) -> None:
    """One image, two nodes, every precision: cuDNN autotuning and Triton compiles stay out of the clock."""
    for p in run.cfg.precisions:
        run.attribute(items[:1], "gausslegendre", 2, p, "loop")
    run.naive(items[:1], "gausslegendre", 2)


# --------------------------------------------------------------------------- training throughput

def training_throughput(cfg: CheckConfig) -> dict:
    """Iterations per second of ``faig train``'s loop with the ``paper`` recipe (batch 16, 64×64 patches)."""
    from faig_fast.apps.train import PRESETS
    from faig_fast.training import TrainConfig, train

    recipe = PRESETS["paper"]
    tc = TrainConfig(arch=cfg.arch, preset=cfg.preset, iters=recipe["baseline_iters"],
                     batch_size=recipe["batch_size"], patch_size=recipe["patch_size"], lr=recipe["baseline_lr"],
                     device=cfg.device, log_every=10_000, ckpt_every=10_000,
                     model_kwargs=recipe["model_kwargs"].get(cfg.arch, {}) if cfg.preset == "paper" else {})
    stamps: list[float] = []

    def tick(it: int, loss: float) -> bool:
        stamps.append(time.perf_counter())
        return it >= cfg.train_iters

    with tempfile.TemporaryDirectory() as tmp:
        images = _training_images(Path(tmp))[: cfg.train_images]
        train(tc, images, Path(tmp) / "run", progress=False, callback=tick)
    warm = min(3, max(0, len(stamps) - 2))  # the first iterations pay for cuDNN autotuning
    its = (len(stamps) - 1 - warm) / (stamps[-1] - stamps[warm]) if len(stamps) > warm + 1 else None
    return {"preset": cfg.preset, "recipe": "paper", "batch_size": tc.batch_size, "patch_size": tc.patch_size,
            "iterations_timed": len(stamps) - 1 - warm, "it_per_s": its,
            "hours_for_recipe": None if not its else (recipe["baseline_iters"] + recipe["finetune_iters"]) / its / 3600}


def _training_images(tmp: Path) -> list[Path]:
    """SunHays80 when present, else the bundled demo photographs written as PNGs."""
    from faig_fast.data import demo_images

    folder = data_root() / "SunHays80"
    if folder.is_dir():
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    from PIL import Image

    paths = []
    for name, img in demo_images():
        path = tmp / f"{name}.png"
        Image.fromarray((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- report

def environment(device: torch.device) -> dict:
    """Versions and the math flags that change what fp32 means on a GPU."""
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    env = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
           "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    if device.type == "cuda":
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(device)
    return env


def lam_check(cfg: CheckConfig) -> dict:
    """LAM on the device: the naive per-step loop vs ``method="lam"`` at 50 steps vs the fast rule, and
    ``lam_windows`` windows of one image in one call vs one call each, on an LR crop and full Set14 images."""
    from faig_fast.apps.lam_bench import bench_inputs, bench_lam, pair_model, spread_windows

    model = pair_model(cfg.lam_pair)
    scale = getattr(model, "upscale", 1)
    inputs = [("crop", *bench_inputs(cfg.lam_size, 1, scale)[0])]
    inputs += [("full", n, x) for n, x in bench_inputs(None, cfg.lam_full_images, scale)] if cfg.lam_full_images else []
    runs = []
    for kind, name, lr in inputs:
        ws = spread_windows((lr.shape[-2] * scale, lr.shape[-1] * scale), cfg.lam_windows, min(16, lr.shape[-1]))
        runs.append({"input": kind, "image": name, **bench_lam(model, lr, ws, device=cfg.device)})
    return {"pair": cfg.lam_pair, "runs": runs}


def _lam_markdown(lam: dict) -> list[str]:
    if "runs" not in lam:
        return ["", f"**LAM**: {lam.get('skipped') or lam.get('error')}"]
    lines = ["", f"**LAM** ({lam['pair']} target):", "", "| input | case | s | speed-up (vs naive; K windows: vs K calls) | Pearson r vs exact |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in lam["runs"]:
        for case, c in r["cases"].items():
            sp = c.get("speedup_vs_naive", c.get("speedup_vs_single_calls", float("nan")))
            lines.append(f"| {r['input']} {r['image']} {tuple(r['image_shape'][-2:])} | {case} | {c['seconds']:.3f} | "
                         f"{sp:.2f} | {c.get('pearson_r', float('nan')):.5f} |")
    return lines


def markdown(doc: dict) -> str:
    """The results as Markdown: environment, tests, one table of every timed row, training."""
    env, t = doc["environment"], doc["tests"]
    lines = [f"# gpu-check on {env['device']} ({env['time']})", "",
             f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}; cudnn.allow_tf32="
             f"{env['cudnn_allow_tf32']}; pair: {doc['pair']}", "",
             f"**Tests**: {t.get('summary') or t.get('skipped')}", "",
             "| workload | rule | case | precision | strategy | s | speed-up | TFLOP/s | % peak | GB/s | % BW | "
             "peak MiB | top-1% J vs fp64 | note |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in doc["rows"]:
        rl = r.get("roofline", {})

        def f(x, fmt):
            return "" if x is None or x != x else format(x, fmt)
        lines.append(
            f"| {r['workload']} | {r['rule']} | {r['case']} | {r['precision']} | "
            f"{r.get('strategy_used') or r.get('strategy', '')} | {f(r.get('seconds'), '.3f')} | "
            f"{f(r.get('speedup_vs_naive'), '.1f')} | {f(rl.get('achieved_tflop_s'), '.3g')} | "
            f"{f(100 * rl['fraction_of_peak_flops'] if 'fraction_of_peak_flops' in rl else None, '.1f')} | "
            f"{f(rl.get('achieved_gb_s'), '.0f')} | "
            f"{f(100 * rl['fraction_of_peak_bw'] if 'fraction_of_peak_bw' in rl else None, '.1f')} | "
            f"{f(r.get('peak_memory_mib'), '.0f')} | {f(r.get('jaccard_top1_vs_fp64'), '.3f')} | "
            f"{r.get('skipped') or r.get('error') or r.get('extrapolated') or ''} |")
    tr = doc.get("training", {})
    lines += ["", f"**Training** (`paper` recipe, batch {tr.get('batch_size')}): "
                  f"{tr.get('it_per_s') or tr.get('skipped') or tr.get('error')} it/s"]
    lines += _lam_markdown(doc.get("lam", {"skipped": "not run"}))
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:40]


# --------------------------------------------------------------------------- the run

def _guarded(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded in the results
        return {"error": f"{type(exc).__name__}: {str(exc).strip()[:300]}"}


def run_check(cfg: CheckConfig, out_dir: Path | None = None, tag: str | None = None) -> tuple[dict, Path]:
    """Run every part of the check; write ``<out_dir>/gpu-<device>-<date>.json`` and ``.md``."""
    device = torch.device(cfg.device)
    budget = Budget(cfg.budget_s)
    doc: dict = {"config": dataclasses.asdict(cfg), "environment": environment(device)}
    doc["tests"] = run_tests(cfg)
    pair = _pair(cfg.arch, cfg.preset)
    doc["pair"] = pair[2]
    doc["peaks"] = {p: device_peaks(device, p) for p in sorted({"fp32", "fp64", *cfg.precisions})}
    run = Runner(cfg, pair, budget, doc["peaks"])
    crops, desc = _items(cfg, crop=True)
    doc["workloads"] = {"crops": desc}
    _warm_up(run, crops)
    for method, steps in cfg.rules:
        _rule_jobs(run, crops, "crops", method, steps, 1.0)
    _strategy_jobs(run, crops, "crops")
    doc["training"] = _guarded(lambda: training_throughput(cfg)) if budget.fits(30) else {"skipped": "over budget"}
    if cfg.full:
        full, doc["workloads"]["full"] = _items(cfg, crop=False)
        for method, steps in sorted(cfg.rules, key=lambda r: r[1]):  # the cheap rule first
            scale = steps / cfg.naive_full_steps if steps > cfg.naive_full_steps else 1.0
            _rule_jobs(run, full, "full", method, steps, scale)
    doc["lam"] = _guarded(lambda: lam_check(cfg)) if budget.fits(20) else {"skipped": "over budget"}
    doc["rows"] = run.rows
    doc["seconds"] = cfg.budget_s - budget.left()
    name = f"gpu-{tag or _slug(doc['environment']['device'])}-{time.strftime('%Y%m%d')}"
    out_dir = Path(out_dir) if out_dir else results_dir()
    path = atomic_write_json(out_dir / f"{name}.json", doc)
    atomic_write_text(out_dir / f"{name}.md", markdown(doc))
    return doc, path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m faig_fast.apps.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out-dir", default=None, help="default: benchmarks/results (the dry run: a temp folder)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 450)")
    p.add_argument("--dry-run", action="store_true", help="the tiny CPU run, even when CUDA is available")
    p.add_argument("--no-tests", action="store_true", help="skip part (a), the CUDA tests")
    args = p.parse_args(argv)
    if args.dry_run or not torch.cuda.is_available():
        if not args.dry_run:
            print(f"CUDA is not available here (torch {torch.__version__}, CUDA build: {torch.version.cuda}): "
                  "no GPU figure is produced; checking the wiring with a tiny CPU dry run "
                  "(tiny model, 2 images, 2 steps).")
        cfg, tag = dry_run_config(), "cpu-dry-run"
        out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="faig-gpu-check-"))
    else:
        cfg, tag, out_dir = CheckConfig(), None, Path(args.out_dir) if args.out_dir else None
    if args.budget is not None:
        cfg.budget_s = args.budget
    if args.no_tests:
        cfg.tests = ()
    doc, path = run_check(cfg, out_dir, tag)
    print(markdown(doc))
    print(f"results: {path} (+ .md)")
    failed = doc["tests"].get("returncode") not in (None, 0) or doc["tests"].get("summary", "").startswith("timed out")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
