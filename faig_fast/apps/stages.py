"""The stages of ``faig reproduce`` as a table: each stage is a small function of one shared
:class:`Context` and names the files it writes; :class:`Stages` runs each once (skipped when its
files exist and the run resumes) and records its wall time in ``timings.json``.

Order matters only through files: a stage reads what earlier stages wrote (``pair.json``, the
attributions, ``masking.json``) through the context's lazily loaded properties.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from faig_fast.analyses import baselines as B
from faig_fast.analyses import figures as FIG
from faig_fast.analyses import masking as M
from faig_fast.analyses import modulation as MOD
from faig_fast.analyses import prediction as P
from faig_fast.analyses.names import filter_set_name, input_name
from faig_fast.core.attribution import Attribution, top_count
from faig_fast.data import DegradedImageDataset, list_images, loader
from faig_fast.models import load_model
from faig_fast.utils.io import atomic_write_json as write_json
from faig_fast.utils.paths import shipped_pair_dir

DEGS = ("blur", "noise")
METHODS = B.METHODS
Rankings = dict[str, dict[str, torch.Tensor]]


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class Stages:
    """Runs named stages once: skipped when all their output files exist (``resume``)."""

    def __init__(self, out_dir: Path, resume: bool, progress: bool):
        self.out_dir, self.resume, self.progress = out_dir, resume, progress
        self.timings_path = out_dir / "timings.json"
        self.timings: dict[str, float] = read_json(self.timings_path) if self.timings_path.exists() else {}
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def log(self, msg: str) -> None:
        if self.progress:
            print(f"[reproduce] {msg}", flush=True)

    def run(self, name: str, outputs: Sequence[Path], fn: Callable[[], Any]) -> bool:
        """Run ``fn`` unless resuming and every path in ``outputs`` exists; True when it ran."""
        if self.resume and all(Path(p).exists() for p in outputs):
            self.skipped.append(name)
            self.log(f"{name}: done already, skipped")
            return False
        self.log(f"{name}: running")
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        self.timings[name] = dt
        write_json(self.timings_path, self.timings)
        self.ran.append(name)
        self.log(f"{name}: {dt:.1f} s")
        return True


@dataclass
class Context:
    """Everything the stages share: the configuration, the folders and (loaded on first use, after the
    stage that writes them) the model pair, the Set14 images and the attributions."""

    cfg: dict
    preset: str
    data_root: Path
    out_dir: Path
    pair_dir: Path | str | None
    progress: bool
    log: Callable[[str], None]

    @property
    def scale(self) -> int:
        return self.cfg["scale"]

    @property
    def fraction(self) -> float:
        return self.cfg["fraction"]

    @cached_property
    def pair(self) -> dict:
        return read_json(self.out_dir / "pair.json")

    @cached_property
    def baseline(self) -> torch.nn.Module:
        return load_model(self.pair["baseline"]).eval()

    @cached_property
    def target(self) -> torch.nn.Module:
        return load_model(self.pair["target"]).eval()

    @property
    def arch(self) -> str:
        """The pair's own architecture (a given folder may hold another one than ``cfg["arch"]``)."""
        return getattr(self.target, "arch_name", type(self.target).__name__)

    @cached_property
    def set14(self) -> DegradedImageDataset:
        paths = list_images(self.data_root / "Set14")
        if self.cfg["set14_images"]:
            paths = paths[: self.cfg["set14_images"]]
        return DegradedImageDataset(paths, DEGS, scale=self.scale, seed=0, crop=self.cfg["crop"])

    @cached_property
    def gts(self) -> list[tuple[str, torch.Tensor]]:
        ds = self.set14
        return [(ds.names[j], ds.gt(j).clone()) for j in range(len(ds.names))]

    @cached_property
    def faig(self) -> Attribution:
        return Attribution.load(self.out_dir / "faig_set14.safetensors")

    @cached_property
    def ig(self) -> Attribution:
        return Attribution.load(self.out_dir / "ig_set14.safetensors")

    @cached_property
    def tops(self) -> dict[str, torch.Tensor]:
        return {d: self.faig.top(d, self.fraction) for d in DEGS}

    @cached_property
    def bsd_split(self) -> tuple[list[Path], list[Path]]:
        """(calibration, test) images: the first and second half of the sorted BSD68 names, cut to size."""
        bsd = list_images(self.data_root / "BSD68")
        half = len(bsd) // 2
        return bsd[:half][: self.cfg["bsd_calib"]], bsd[half:][: self.cfg["bsd_test"]]

    @property
    def fig_files(self) -> dict[str, Path]:
        fig_dir = self.out_dir / "figures"
        return {"Fig. 3 analogue — masking curves": fig_dir / "masking_curves.png",
                "Fig. 4 analogue — discovered 1% filters per layer": fig_dir / "layer_distribution.png",
                "Fig. 2 analogue — masking 1% filters": fig_dir / "masking_examples.png",
                "Filter modulation strips": fig_dir / "modulation.png"}

    def rankings(self, seed: int) -> Rankings:
        """{method: {degradation: ranking}}; only ``random`` depends on ``seed``."""
        wc = B.rankings("weight_change", "blur", model_a=self.baseline, model_b=self.target)
        n = len(self.faig.index)
        return {"faig": {d: self.faig.ranking(d) for d in DEGS}, "ig": {d: self.ig.ranking(d) for d in DEGS},
                "weight_change": {d: wc for d in DEGS},
                "random": {d: B.rankings("random", d, num_filters=n, seed=seed) for d in DEGS}}


# ---------------------------------------------------------------------------------- 1. the pair
def stage_pair(c: Context) -> None:
    """``pair.json``: the shipped pair, a given folder, or a pair trained here."""
    src = c.pair_dir
    if src == "auto":
        shipped = shipped_pair_dir(f"{c.cfg['arch']}_{c.cfg['train_preset']}")
        src = shipped if (shipped / "baseline.safetensors").exists() else None
    if src is None:
        from faig_fast.apps.train import train_pair
        base, tgt = train_pair(c.cfg["arch"], c.cfg["train_preset"], c.data_root / "SunHays80", c.out_dir / "pair",
                               seed=c.cfg["pair_seed"], scale=c.scale, progress=c.progress)
        info = {"source": "trained here with faig_fast.apps.train.train_pair", "baseline": str(base),
                "target": str(tgt)}
    else:
        src = Path(src)
        kind = "the pair shipped in" if c.pair_dir == "auto" else "the given folder"
        info = {"source": f"{kind} {src}", "baseline": str(src / "baseline.safetensors"),
                "target": str(src / "target.safetensors")}
    for k in ("baseline", "target"):
        load_model(info[k])  # validate now, not five stages later
    write_json(c.out_dir / "pair.json", info)


# ------------------------------------------------------------------------ 2–3. FAIG and IG on Set14
def stage_faig(c: Context) -> None:
    from faig_fast.core.api import attribute
    attribute(c.baseline, c.target, loader(c.set14), steps=c.cfg["steps"], method=c.cfg["method"],
              backend=c.cfg["backend"], keep_per_image=True, progress=c.progress
              ).save(c.out_dir / "faig_set14.safetensors")


def stage_ig(c: Context) -> None:
    B.ig_attribution(c.target, loader(c.set14), c.cfg["ig_steps"], method=c.cfg["ig_method"],
                     keep_per_image=True).save(c.out_dir / "ig_set14.safetensors")


# ------------------------------------------------------------------------------------ 4. masking
def stage_masking(c: Context) -> None:
    """Table 2 over seeds and the Fig. 3 curves (FAIG and random sets, first seed)."""
    seed0 = c.cfg["seeds"][0]
    table = M.masking_table(c.baseline, c.target, c.rankings, c.gts, seeds=c.cfg["seeds"],
                            fractions=c.cfg["table_fractions"], scale=c.scale)
    lqs = M.degraded_inputs(c.gts, DEGS, scale=c.scale, seed=seed0)
    r0 = c.rankings(seed0)
    curves: dict = {}
    for method in ("faig", "random"):
        for mask in DEGS:
            for inp in DEGS:
                curves.setdefault(method, {}).setdefault(mask, {})[inp] = M.masking_curve(
                    c.baseline, c.target, r0[method][mask], lqs[inp], c.cfg["curve_fractions"])
    write_json(c.out_dir / "masking.json", {"table": table, "curves": curves,
                                            "curve_fractions": c.cfg["curve_fractions"]})


# ---------------------------------------------------------------------------------- 5. re-training
def _retrain_jobs(c: Context, seed: int) -> list[tuple[str, torch.Tensor | None, str, str | None]]:
    """(key, filter indices or None for all, task, key of an earlier job with the same filter set)."""
    r = c.rankings(seed)
    n = len(c.faig.index)
    jobs: list[tuple[str, torch.Tensor | None, str, str | None]] = [(f"upper/{t}", None, t, None) for t in DEGS]
    seen: dict[str, str] = {}
    for m in METHODS:
        for fset in DEGS:
            idx = r[m][fset][: top_count(n, c.fraction)]
            for task in DEGS:
                key, sig = f"{m}/{fset}/{task}", f"{sorted(idx.tolist())}/{task}"
                jobs.append((key, idx, task, seen.get(sig)))
                seen.setdefault(sig, key)
    return jobs


def _retrain_all(c: Context) -> dict:
    """Every job of every seed, each saved in ``retrain/partial.json`` as soon as it is done."""
    from faig_fast.analyses.evaluate import evaluate
    from faig_fast.analyses.retrain import retrain_filters
    data = list_images(c.data_root / "SunHays80")
    if c.cfg["retrain_images"]:
        data = data[: c.cfg["retrain_images"]]
    partial_path = c.out_dir / "retrain" / "partial.json"
    done: dict = read_json(partial_path) if partial_path.exists() else {}
    for seed in c.cfg["retrain_seeds"]:
        for key, idx, task, same_as in _retrain_jobs(c, seed):
            full = f"{seed}/{key}"
            if full in done:
                continue
            if same_as is not None and f"{seed}/{same_as}" in done:
                done[full] = done[f"{seed}/{same_as}"]  # identical filter set (e.g. |θ−θ̄|): same run
            else:
                c.log(f"re-train seed {seed} {key}")
                path = retrain_filters(c.pair["baseline"], idx, task, data,
                                       c.out_dir / "retrain" / f"seed{seed}" / key.replace("/", "_"),
                                       iters=c.cfg["retrain_iters"], seed=seed, lr=c.cfg["retrain_lr"],
                                       batch_size=c.cfg["retrain_batch"], patch_size=c.cfg["retrain_patch"],
                                       progress=False)
                done[full] = evaluate(load_model(path), c.gts, (task,), scale=c.scale, seed=seed)[task]
            write_json(partial_path, done)
    return done


def stage_retrain(c: Context) -> None:
    """Table 3: re-train each method's top filters (and all filters) on each task, per seed."""
    from faig_fast.analyses.evaluate import evaluate
    done = _retrain_all(c)
    seeds = c.cfg["retrain_seeds"]
    res: dict = {"fraction": c.fraction, "iters": c.cfg["retrain_iters"], "seeds": seeds, "scale": c.scale,
                 "inputs": list(DEGS), "upper": {t: [done[f"{s}/upper/{t}"] for s in seeds] for t in DEGS},
                 "methods": {m: {fs: {t: [done[f"{s}/{m}/{fs}/{t}"] for s in seeds] for t in DEGS}
                                 for fs in DEGS} for m in METHODS}}
    res["reference"] = {name: evaluate(model, c.gts, DEGS, scale=c.scale, seed=seeds[0])
                        for name, model in (("baseline", c.baseline), ("target", c.target))}
    write_json(c.out_dir / "retrain.json", res)


# ------------------------------------------------------------------------ 6. degradation prediction
def _bsd_attribution(c: Context, paths: list[Path], out: Path) -> None:
    from faig_fast.core.api import attribute
    ds = DegradedImageDataset(paths, tuple(c.cfg["prediction_labels"]), scale=c.scale, seed=0,
                              crop=c.cfg["bsd_crop"])
    attribute(c.baseline, c.target, loader(ds), steps=c.cfg["prediction_steps"], method=c.cfg["method"],
              backend=c.cfg["backend"], keep_per_image=True, progress=c.progress).save(out)


def stage_bsd_calib(c: Context) -> None:
    _bsd_attribution(c, c.bsd_split[0], c.out_dir / "faig_bsd68_calib.safetensors")


def stage_bsd_test(c: Context) -> None:
    _bsd_attribution(c, c.bsd_split[1], c.out_dir / "faig_bsd68_test.safetensors")


def stage_prediction(c: Context) -> None:
    from faig_fast.apps.report import PAPER_PREDICTION
    calib, test = c.bsd_split
    res = P.run_prediction(c.faig, Attribution.load(c.out_dir / "faig_bsd68_calib.safetensors"),
                           Attribution.load(c.out_dir / "faig_bsd68_test.safetensors"), fraction=c.fraction,
                           degradations=DEGS, fixed_thresholds=PAPER_PREDICTION["thresholds"])
    res["split"] = (f"Discover: Set14 ({len(c.gts)} images); calibrate: BSD68 sorted names "
                    f"{calib[0].name}…{calib[-1].name} ({len(calib)}); test: "
                    f"{test[0].name}…{test[-1].name} ({len(test)}); labels "
                    f"{', '.join(c.cfg['prediction_labels'])}.")
    write_json(c.out_dir / "prediction.json", res)


# --------------------------------------------------------------------------------- 7. modulation
def stage_modulation(c: Context) -> None:
    """PSNR as only the top filters move from θ̄ (λ=0) to θ (λ=1), target weights elsewhere."""
    from faig_fast.analyses.evaluate import evaluate
    psnr: dict = {}
    for fset in DEGS:
        for lam in c.cfg["lams"]:
            res = evaluate(MOD.modulate(c.baseline, c.target, c.tops[fset], lam), c.gts, DEGS, scale=c.scale, seed=0)
            for inp in DEGS:
                psnr.setdefault(fset, {}).setdefault(inp, []).append(res[inp])
    write_json(c.out_dir / "modulation.json", {"lams": c.cfg["lams"], "psnr": psnr, "fraction": c.fraction})


# ------------------------------------------------------------------------------------ 8. figures
def _masking_examples(c: Context, lqs: dict[str, list[torch.Tensor]], j: int, path: Path) -> None:
    """Fig. 2 analogue: target outputs beside outputs with the 1% (FAIG, random) filters masked."""
    rnd = c.rankings(c.cfg["seeds"][0])["random"]
    models = [("target output", c.target),
              (f"1% {filter_set_name('blur')} masked", M.mask_filters(c.baseline, c.target, c.tops["blur"])),
              (f"1% {filter_set_name('noise')} masked", M.mask_filters(c.baseline, c.target, c.tops["noise"])),
              ("1% random masked", M.mask_filters(c.baseline, c.target,
                                                  rnd["blur"][: top_count(len(c.faig.index), c.fraction)]))]
    rows = []
    with torch.no_grad():
        for inp in DEGS:
            x = lqs[inp][0]
            cells = [(f"{input_name(inp, noun=True)} (LR)", x)]
            cells += [(title, m(x[None].to(next(m.parameters())))[0].clamp(0, 1)) for title, m in models]
            rows.append((input_name(inp, noun=True), cells))
    FIG.plot_image_grid(rows, path, title=f"{c.gts[j][0]}: masking discovered filters")


def stage_figures(c: Context) -> None:
    files = list(c.fig_files.values())
    mk = read_json(c.out_dir / "masking.json")
    FIG.plot_masking_curves(mk["curves"], mk["curve_fractions"], files[0],
                            title=f"masking FAIG vs random filters ({c.arch}, {c.preset})")
    FIG.plot_layer_distribution(c.faig.index, c.tops, files[1])
    names = [n for n, _ in c.gts]
    j = names.index(c.cfg["example"]) if c.cfg["example"] in names else 0
    lqs = M.degraded_inputs([c.gts[j]], DEGS, scale=c.scale, seed=c.cfg["seeds"][0])
    _masking_examples(c, lqs, j, files[2])
    strips = {f"{filter_set_name(d)} filters, {input_name(d, noun=True)}": MOD.modulation_strip(
        c.baseline, c.target, c.tops[d], lqs[d][0], c.cfg["lams"]) for d in DEGS}
    FIG.plot_modulation_strips(strips, c.cfg["lams"], files[3],
                               title="θ̄ + λ(θ − θ̄) on the top 1% filters, target elsewhere")


# --------------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Stage:
    name: str
    outputs: Callable[[Context], list[Path]]
    run: Callable[[Context], None]


def _files(*names: str) -> Callable[[Context], list[Path]]:
    return lambda c: [c.out_dir / n for n in names]


#: The reproduction, in order (the report is written after them, whenever one of them ran).
STAGES: tuple[Stage, ...] = (
    Stage("pair", _files("pair.json"), stage_pair),
    Stage("faig_set14", _files("faig_set14.safetensors"), stage_faig),
    Stage("ig_set14", _files("ig_set14.safetensors"), stage_ig),
    Stage("masking", _files("masking.json"), stage_masking),
    Stage("retrain", _files("retrain.json"), stage_retrain),
    Stage("faig_bsd68_calib", _files("faig_bsd68_calib.safetensors"), stage_bsd_calib),
    Stage("faig_bsd68_test", _files("faig_bsd68_test.safetensors"), stage_bsd_test),
    Stage("prediction", _files("prediction.json"), stage_prediction),
    Stage("modulation", _files("modulation.json"), stage_modulation),
    Stage("figures", lambda c: list(c.fig_files.values()), stage_figures),
)


def run_stages(c: Context, st: Stages) -> None:
    """Run (or skip, when resuming) every stage of :data:`STAGES` in order."""
    for stage in STAGES:
        st.run(stage.name, stage.outputs(c), lambda stage=stage: stage.run(c))
