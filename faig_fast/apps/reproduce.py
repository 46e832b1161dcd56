"""End-to-end reproduction of the FAIG paper's analyses, resumable, from one call.

``reproduce("tiny")`` runs, in ``out_dir``:

1. ``pair.json`` — the baseline/target pair: a shipped pair, a given folder, or ``train_pair``;
2. ``faig_set14.safetensors`` — FAIG on Set14 (blur, noise; per-image scores kept);
3. ``ig_set14.safetensors`` — the IntInf-style IG baseline on the same images;
4. ``masking.json`` — Table 2 (+ the cross table) over seeds, and Fig. 3 masking curves;
5. ``retrain.json`` — Table 3: re-train each method's 1% filters (and all filters) on each task;
6. ``faig_bsd68_calib.safetensors``, ``faig_bsd68_test.safetensors``, ``prediction.json`` — Sec. 5.3;
7. ``modulation.json`` — PSNR as only the discovered filters move from θ̄ to θ;
8. ``figures/*.png`` — Figs. 2, 3, 4 analogues and modulation strips;
9. ``report.md`` — everything beside the paper's numbers (rewritten whenever a stage ran).

Steps 1–8 are the table :data:`faig_fast.apps.stages.STAGES`. Each stage writes its file atomically
(temp + ``os.replace``) and is skipped when the file exists (``resume=True``); ``timings.json`` keeps
each stage's wall time. ``config.json`` pins the
configuration: resuming with a different one is refused.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from faig_fast import __version__
from faig_fast.analyses import figures as FIG
from faig_fast.analyses.names import filter_set_name
from faig_fast.apps.report import write_report
from faig_fast.apps.stages import DEGS, Context, Stages, read_json, run_stages
from faig_fast.core.attribution import Attribution, jaccard, top_count
from faig_fast.errors import InvalidInputError
from faig_fast.utils.io import atomic_write_json as write_json
from faig_fast.utils.paths import data_root as default_data_root

_COMMON: dict[str, Any] = {
    "arch": "msrresnet", "scale": 2, "pair_seed": 0, "set14_images": None, "backend": "auto",
    "fraction": 0.01, "table_fractions": [0.01, 0.03, 0.05, 0.10],
    "curve_fractions": [0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0],
    "prediction_labels": ["clean", "blur", "noise"], "retrain_batch": 16, "retrain_patch": 64,
    "retrain_lr": 5e-5, "retrain_images": None, "retrain_seeds": None,
    "lams": [0.0, 0.25, 0.5, 0.75, 1.0], "example": "comic",
}

#: Per-preset analysis settings (the training recipe itself is ``faig_fast.apps.train.PRESETS[preset]``).
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    # The pair is the shipped `small`-recipe pair (the tiny-recipe pair learns too little deblurring to
    # show the paper's findings); analysis sizes are cut to fit ≈ 11 minutes.
    "tiny": {**_COMMON, "train_preset": "small", "crop": 128, "steps": 32, "method": "gausslegendre",
             "ig_steps": 32, "ig_method": "gausslegendre", "bsd_calib": 12, "bsd_test": 12, "bsd_crop": 96,
             "prediction_steps": 16, "retrain_iters": 250, "retrain_batch": 8, "retrain_patch": 48,
             "retrain_lr": 2e-4, "retrain_images": 16},
    # ≈ an hour or two on a CPU.
    "small": {**_COMMON, "train_preset": "small", "crop": 256, "steps": 50, "method": "gausslegendre",
              "ig_steps": 50, "ig_method": "gausslegendre", "bsd_calib": 17, "bsd_test": 17, "bsd_crop": 192,
              "prediction_steps": 32, "retrain_iters": 1000},
    # The paper's sizes: full images, N=100 left Riemann sums, full BSD68 halves (GPU-sized).
    "paper": {**_COMMON, "train_preset": "paper", "crop": None, "steps": 100, "method": "riemann_left",
              "ig_steps": 100, "ig_method": "riemann_left", "bsd_calib": 34, "bsd_test": 34, "bsd_crop": None,
              "prediction_steps": 100, "retrain_iters": 100_000},
}


def reductions_for(cfg: dict, n_set14: int, n_bsd: tuple[int, int]) -> list[str]:
    """Human-readable list of every way this configuration departs from the paper's protocol."""
    r = []
    if cfg["train_preset"] != "paper":
        r.append(f"Model pair: `{cfg['arch']}` trained with the `{cfg['train_preset']}` recipe of "
                 "`faig_fast.apps.train.PRESETS` (narrower network, far fewer iterations, SunHays80 instead of DIV2K) "
                 "instead of the paper's 16×64 SRResNet trained 100K + 100K iterations on DIV2K.")
    else:
        r.append("Training data: SunHays80 stands in for DIV2K-train.")
    if cfg["crop"]:
        r.append(f"Set14 GT images centre-cropped to {cfg['crop']}×{cfg['crop']} px ({n_set14} images) for FAIG, "
                 "IG, masking, re-training evaluation and modulation; the paper uses full images.")
    if (cfg["steps"], cfg["method"]) != (100, "riemann_left"):
        r.append(f"FAIG path integral: {cfg['steps']}-node `{cfg['method']}` quadrature instead of the "
                 "paper's 100-step left Riemann sum (Eq. 6).")
    if (cfg["ig_steps"], cfg["ig_method"]) != (100, "riemann_left"):
        r.append(f"IG baseline: {cfg['ig_steps']}-node `{cfg['ig_method']}` instead of 100 left-Riemann steps.")
    r.append("IG baseline = the authors' IntInf-style variant (input path clean bilinear LR → degraded LR through "
             "the target model, gradient of the output sum w.r.t. the filters); we rank by Eq. 7 (mean over D "
             "minus mean over the other degradation) where their script ranks the plain mean over D.")
    r.append("Masking measure: gradient maps are central differences of the BT.601 gray image (the paper's "
             "description; the authors' script effectively reads the blue channel).")
    r.append(f"Degradation prediction: discover on Set14, calibrate T_D on the first half of the sorted BSD68 file "
             f"names ({n_bsd[0]} images used), test on the second half ({n_bsd[1]} used); the paper uses "
             "BSD100 and DIV2K-val. Labels: clean, blur, noise (clean images are negatives for both)."
             + (f" BSD68 GTs centre-cropped to {cfg['bsd_crop']} px." if cfg["bsd_crop"] else "")
             + (f" Per-image FAIG with {cfg['prediction_steps']} nodes." if cfg["prediction_steps"] != cfg["steps"]
                else ""))
    if cfg["retrain_iters"] < 100_000 or cfg["retrain_batch"] != 16 or cfg["retrain_patch"] != 64:
        r.append(f"Re-training: {cfg['retrain_iters']} iterations, batch {cfg['retrain_batch']} of "
                 f"{cfg['retrain_patch']}² GT patches, lr {cfg['retrain_lr']:g}"
                 + (f", on the first {cfg['retrain_images']} SunHays80 images" if cfg["retrain_images"] else "")
                 + "; each task (blur or noise, applied to every sample) re-trained separately. The paper does "
                   "not state its re-training length.")
    if cfg["seeds"] != [0, 1, 2]:
        r.append(f"Seeds: {cfg['seeds']} instead of 3.")
    return r


# -------------------------------------------------------------------------------------- stages
def reproduce(preset: str = "tiny", *, data_root: Path | str | None = None, out_dir: Path | str | None = None,
              seeds: Sequence[int] = (0, 1, 2), steps: int | None = None, resume: bool = True,
              progress: bool = True, pair_dir: Path | str | None = "auto",
              config: dict[str, Any] | None = None, threads: int | None = None) -> Path:
    """Run the whole reproduction for ``preset`` ("tiny", "small", "paper"); returns ``report.md``.

    ``data_root`` holds Set14/, BSD68/ and SunHays80/ (default ``../shared/data``). ``pair_dir``:
    ``"auto"`` uses the shipped pair ``faig_fast/assets/pairs/<arch>_<preset>`` when present and
    trains one otherwise; ``None`` always trains (``train_pair``); a folder uses its
    ``baseline.safetensors`` / ``target.safetensors``. ``steps`` overrides every quadrature size;
    ``config`` overrides any key of ``PRESET_CONFIGS[preset]``. ``seeds``: masking (random sets,
    input noise) and re-training (training) seeds. ``threads``: torch intra-op threads for the run
    (restored afterwards); 1 is fastest for the tiny preset on a shared 2-core CPU.
    """
    if threads is None:
        return _reproduce(preset, data_root, out_dir, seeds, steps, resume, progress, pair_dir, config)
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _reproduce(preset, data_root, out_dir, seeds, steps, resume, progress, pair_dir, config)
    finally:
        torch.set_num_threads(before)


def _reproduce(preset: str, data_root: Path | str | None, out_dir: Path | str | None, seeds: Sequence[int],
               steps: int | None, resume: bool, progress: bool, pair_dir: Path | str | None,
               config: dict[str, Any] | None) -> Path:
    cfg = resolve_config(preset, config, steps, seeds)
    data_root = Path(data_root) if data_root is not None else default_data_root()
    if out_dir is None:
        suffix = "" if cfg["arch"] == "msrresnet" else f"-{cfg['arch']}"
        out_dir = Path("runs") / f"reproduce-{preset}{suffix}"
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, data_root, cfg, resume)
    st = Stages(out_dir, resume, progress)
    ctx = Context(cfg=cfg, preset=preset, data_root=data_root, out_dir=out_dir, pair_dir=pair_dir,
                  progress=progress, log=st.log)
    run_stages(ctx, st)
    report_path = out_dir / "report.md"
    if st.ran or not report_path.exists() or not resume:
        t0 = time.perf_counter()
        calib, test = ctx.bsd_split
        results = assemble_results(out_dir, cfg, ctx.faig, ctx.tops, ctx.fig_files, len(ctx.gts),
                                   (len(calib), len(test)), {**ctx.pair, "arch": ctx.arch})
        results["timings"] = dict(st.timings)
        results["timings"]["report"] = time.perf_counter() - t0
        write_report(report_path, results)
        st.log(f"report: {report_path}")
    return report_path


def resolve_config(preset: str, config: dict[str, Any] | None, steps: int | None, seeds: Sequence[int]) -> dict:
    """``PRESET_CONFIGS[preset]`` with ``config`` overrides, ``steps`` and ``seeds`` applied and checked."""
    if preset not in PRESET_CONFIGS:
        raise InvalidInputError(f"unknown preset {preset!r}; choose one of {sorted(PRESET_CONFIGS)}")
    cfg = copy.deepcopy(PRESET_CONFIGS[preset])
    unknown = sorted(set(config or {}) - set(cfg))
    if unknown:
        raise InvalidInputError(f"unknown config key(s) {unknown}; valid: {sorted(cfg)}")
    cfg.update(copy.deepcopy(config or {}))
    if steps is not None:
        cfg["steps"] = cfg["ig_steps"] = cfg["prediction_steps"] = int(steps)
    cfg["seeds"] = [int(s) for s in seeds]
    if not cfg["seeds"]:
        raise InvalidInputError("seeds is empty")
    cfg["retrain_seeds"] = list(cfg["retrain_seeds"] or cfg["seeds"])
    cfg["preset"] = preset
    return cfg


def _prepare_out_dir(out_dir: Path, data_root: Path, cfg: dict, resume: bool) -> None:
    """Check the data folders, refuse to resume a run of another configuration, pin this one."""
    for sub in ("Set14", "BSD68", "SunHays80"):
        if not (data_root / sub).is_dir():
            raise InvalidInputError(f"data_root {data_root} has no {sub}/ folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = out_dir / "config.json"
    if resume and cfg_path.exists():
        old = read_json(cfg_path)
        if old.get("analysis") != json.loads(json.dumps(cfg)):
            raise InvalidInputError(f"{out_dir} holds a run with a different configuration ({cfg_path}); "
                                    "use another out_dir or resume=False")
    if not resume:
        for sub in ("retrain", "pair"):
            shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / "timings.json").unlink(missing_ok=True)
    write_json(cfg_path, {"analysis": cfg, "data_root": str(data_root)})


# -------------------------------------------------------------------------------------- results
def _layer_distribution(faig: Attribution, tops: dict[str, torch.Tensor], frac: float) -> dict:
    index = faig.index
    L = len(index.layers)
    counts = {d: FIG.layer_counts(index, t).tolist() for d, t in tops.items()}
    depth = {d: float(np.mean(index.layer_of(t).numpy() / max(1, L - 1))) for d, t in tops.items()}
    return {"fraction": frac, "layers": [[l.name.removesuffix(".weight"), l.num_filters] for l in index.layers],
            "counts": counts, "centroid": depth, "jaccard": jaccard(tops["blur"], tops["noise"])}


Finding = tuple[str, "bool | None", str]


def _masking_findings(mk: dict) -> list[Finding]:
    fr, mean = mk["fractions"], mk["mean"]
    i1 = fr.index(0.01) if 0.01 in fr else 0
    p = f"{100 * fr[i1]:g}%"
    own = {d: {m: mean[d][d][m][i1] for m in mk["methods"]} for d in mk["inputs"]}
    out: list[Finding] = []
    ok = all(own[d]["faig"] > own[d]["random"] for d in own)
    out.append((f"Masking {p} FAIG filters hurts far more than masking {p} random filters (Table 2, Fig. 3)", ok,
                "; ".join(f"{d}: FAIG {own[d]['faig']:.3f} vs random {own[d]['random']:.3f}" for d in own)))
    ok = all(own[d]["faig"] >= max(own[d]["ig"], own[d]["weight_change"]) for d in own)
    out.append((f"FAIG finds more important {p} filters than IG and |θ−θ̄| (Table 2)", ok,
                "; ".join(f"{d}: FAIG {own[d]['faig']:.3f}, IG {own[d]['ig']:.3f}, |θ−θ̄| "
                          f"{own[d]['weight_change']:.3f}" for d in own)))
    if set(mk["inputs"]) >= set(DEGS):
        a, b = mean["blur"]["blur"]["faig"][i1], mean["blur"]["noise"]["faig"][i1]
        c, d = mean["noise"]["noise"]["faig"][i1], mean["noise"]["blur"]["faig"][i1]
        out.append((f"The {p} FAIG filters are discriminative: masking them removes their own function more "
                    "than the other one (Fig. 3 ①–④)", a > b and c > d,
                    f"blurry input: deblurring set {a:.3f} vs denoising set {b:.3f}; noisy input: denoising "
                    f"set {c:.3f} vs deblurring set {d:.3f}"))
    return out


def _retrain_findings(rt: dict) -> list[Finding]:
    def mean_of(v: list) -> float:
        return float(np.mean(v))
    parts, ok = [], True
    for d in DEGS:
        f_, r_ = mean_of(rt["methods"]["faig"][d][d]), mean_of(rt["methods"]["random"][d][d])
        ok &= f_ > r_
        parts.append(f"{d} task, {filter_set_name(d)} filters: FAIG {f_:.3f} vs random {r_:.3f} dB")
    out: list[Finding] = [("Re-training only the 1% FAIG filters of a degradation beats re-training 1% random "
                           "filters (Table 3)", ok, "; ".join(parts))]
    parts, ok = [], True
    for d in DEGS:
        o = "noise" if d == "blur" else "blur"
        own_, other_ = mean_of(rt["methods"]["faig"][d][d]), mean_of(rt["methods"]["faig"][o][d])
        ok &= own_ > other_
        parts.append(f"{d} task: own set {own_:.3f} vs other set {other_:.3f} dB")
    out.append(("For a task, re-training its own FAIG filters beats re-training the other degradation's "
                "FAIG filters (Table 3)", ok, "; ".join(parts)))
    return out


def _prediction_finding(pr: dict) -> Finding:
    acc = pr.get("protocols", {}).get("degraded_only", pr)["test_accuracy"]
    full = pr["test_accuracy"]
    return ("Overlap scores tell blurry from noisy inputs with ≥ 90% accuracy (Sec. 5.3: 98% noise, "
            "96% blur)", all(acc[d] >= 0.9 for d in pr["degradations"]),
            "blurry vs noisy test images, calibrated T_D: "
            + ", ".join(f"{d} {100 * acc[d]:.1f}%" for d in pr["degradations"])
            + "; with clean images as negatives too: "
            + ", ".join(f"{d} {100 * full[d]:.1f}%" for d in pr["degradations"]) + ".")


def _modulation_finding(mod: dict) -> Finding:
    parts, ok = [], True
    for d in DEGS:
        v = mod["psnr"][d][d]
        ok &= v[-1] > v[0]
        parts.append(f"{filter_set_name(d)} filters on {d} inputs: λ=0 {v[0]:.3f} → λ=1 {v[-1]:.3f} dB")
    return ("Moving only the 1% filters from θ̄ to θ restores their function (modulation)", ok, "; ".join(parts))


def _findings(res: dict) -> list[Finding]:
    """The paper's qualitative claims, checked against this run's numbers."""
    out: list[Finding] = []
    if res.get("masking"):
        out += _masking_findings(res["masking"])
    if res.get("retrain"):
        out += _retrain_findings(res["retrain"])
    dist = res.get("distribution")
    if dist:
        cb, cn = dist["centroid"]["blur"], dist["centroid"]["noise"]
        out.append(("Deblurring filters lie deeper in the network than denoising filters (Fig. 4)", cb > cn,
                    f"mean relative depth: deblurring {cb:.2f}, denoising {cn:.2f}"))
    if res.get("prediction"):
        out.append(_prediction_finding(res["prediction"]))
    if res.get("modulation"):
        out.append(_modulation_finding(res["modulation"]))
    return out


def assemble_results(out_dir: Path, cfg: dict, faig: Attribution, tops: dict[str, torch.Tensor],
                     fig_files: dict[str, Path], n_set14: int, n_bsd: tuple[int, int], pair: dict) -> dict:
    """Gather every stage's output into the dict :func:`faig_fast.apps.report.write_report` renders."""
    res: dict[str, Any] = {"config": cfg}
    if (out_dir / "masking.json").exists():
        res["masking"] = read_json(out_dir / "masking.json")["table"]
    for key in ("retrain", "prediction", "modulation"):
        if (out_dir / f"{key}.json").exists():
            res[key] = read_json(out_dir / f"{key}.json")
    res["distribution"] = _layer_distribution(faig, tops, cfg["fraction"])
    res["findings"] = _findings(res)
    res["figures"] = {t: os.path.relpath(p, out_dir) for t, p in fig_files.items() if p.exists()}
    res["reductions"] = reductions_for(cfg, n_set14, n_bsd)
    res["summary"] = (f"Model pair: {pair['source']} (`{pair.get('arch', cfg['arch'])}`, {len(faig.index)} filters; "
                      f"1% = {top_count(len(faig.index), cfg['fraction'])} filters). Paper numbers: 16×64 "
                      "SRResNet, full Set14, DIV2K training. Numbers are not expected to match at reduced "
                      "sizes; the qualitative checks below say which findings carry over.")
    res["environment"] = (f"faig_fast {__version__}, torch {torch.__version__}, Python "
                          f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPU cores, "
                          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}, {torch.get_num_threads()} torch "
                          f"thread(s); load average when the report was written: "
                          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())} (the machine is shared: timings are "
                          "pessimistic).")
    return res
