"""The ``faig`` command line: attribute, train, reproduce, bench, study, demo, lam, info."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from faig_fast.apps.lam_cli import add_lam_parser, cmd_lam
from faig_fast.errors import FAIGError
from faig_fast.core.quadrature import FAST_GL_NODES

from faig_fast.utils.paths import data_root, resolve_pair_dir, results_dir

DEFAULT_DATA = data_root()


def _arch_choices() -> list[str]:
    from faig_fast.models import list_models

    return list_models()


def _bytes(text: str) -> int:
    """A byte count such as ``2000000``, ``512M`` or ``2G`` (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B")
    mult = units.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in units else t
    try:
        value = int(float(num) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r} (e.g. 2000000, 512M, 2G)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"byte count must be positive, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _add_attribute(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attribute", help="FAIG of a baseline/target pair over an image folder")
    p.add_argument("--baseline", required=True, help="baseline model θ̄ (safetensors or .pth state dict)")
    p.add_argument("--target", required=True, help="target model θ (fine-tuned for blur+noise)")
    p.add_argument("--arch", default=None, choices=[*_arch_choices(), "auto"],
                   help="architecture for checkpoints without metadata; 'auto' detects it (registered "
                        "architectures, else the optional spandrel package)")
    p.add_argument("--model-class", default=None, metavar="PACKAGE.MODULE:CLASS",
                   help="build your own architecture for plain state-dict checkpoints (importable module)")
    p.add_argument("--model-kwargs", default=None, metavar="JSON",
                   help='constructor arguments of --model-class / --arch as a JSON object, e.g. \'{"feat": 32}\'')
    p.add_argument("--data", default=str(DEFAULT_DATA / "Set14"), help="image folder (default: ../shared/data/Set14)")
    p.add_argument("--degradations", nargs="+", default=["blur", "noise"])
    p.add_argument("--scale", type=int, default=None,
                   help="the model's upscaling factor (default: its `upscale`/`scale` attribute, else measured "
                        "from one forward pass; 1 for denoisers)")
    p.add_argument("--gray", action="store_true", help="1-channel (grayscale) images, for gray models")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--method", default="riemann_left")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton", "cuda"],
                   help="per-filter reduction backend")
    p.add_argument("--internal-batch-size", type=_positive_int, default=None, metavar="N",
                   help="most steps (images, for vmap) in one batched pass (default: planned from free memory)")
    p.add_argument("--memory-budget", type=_bytes, default=None, metavar="BYTES",
                   help="memory the batched passes may plan for, e.g. 4G (default: the device's free memory)")
    p.add_argument("--check-completeness", action=argparse.BooleanOptionalAction, default=True,
                   help="check Eq. 4 (Σ FAIG = L(θ̄) − L(θ)) on a sample of images and warn when it fails")
    p.add_argument("--filters", default="conv", choices=["conv", "conv+linear"],
                   help="what a filter is: K×K conv slices, or also each Linear weight element")
    p.add_argument("--mode", default="eval", choices=["eval", "train", "as-is"],
                   help="module mode of both models during the attribution")
    p.add_argument("--by", default="filter", choices=["filter", "channel", "layer"],
                   help="granularity of the listed top units")
    p.add_argument("--crop", type=int, default=None, help="center-crop GT images to this size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=float, default=0.01,
                   help="fraction of units in the index files and the --json output per degradation")
    p.add_argument("--show", type=int, default=10, metavar="N", help="rows of the printed table per degradation")
    p.add_argument("--json", action="store_true",
                   help="print a machine-readable JSON summary (every top unit with its score) instead of tables")
    p.add_argument("--out", default="runs/attribution.safetensors")
    p.add_argument("--index-dir", default=None, help="also write authors-style top-filter index .txt files here")
    p.add_argument("--keep-per-image", action="store_true")
    p.add_argument("--resume-dir", default=None,
                   help="persist each finished batch here (atomically) and resume from them; a folder of a run "
                        "with other settings, models or images is refused")


def cmd_attribute(args: argparse.Namespace) -> int:
    from faig_fast.apps.runs import finish_distributed, init_distributed

    rank, world = init_distributed()
    done = False
    try:
        rc = _attribute(args, rank, world)
        done = True
        return rc
    finally:
        finish_distributed(wait=done)


def _load_pair(args: argparse.Namespace) -> tuple:
    """The baseline and target models per --arch / --model-class / --model-kwargs."""
    from faig_fast.apps.model_args import model_loader

    load = model_loader(args)
    return load(args.baseline), load(args.target)


def _attribute(args: argparse.Namespace, rank: int, world: int) -> int:
    from faig_fast.core.api import attribute
    from faig_fast.core.batches import resolve_scale
    from faig_fast.data import DegradedImageDataset

    model_a, model_b = _load_pair(args)
    channels = 1 if args.gray else 3
    scale = args.scale if args.scale is not None else resolve_scale(model_b, channels, f"--target {args.target}")
    dataset = DegradedImageDataset(args.data, tuple(args.degradations), scale=scale, seed=args.seed,
                                   crop=args.crop, channels=channels)
    t0 = time.perf_counter()
    result = attribute(model_a, model_b, dataset, steps=args.steps, method=args.method, strategy=args.strategy,
                       precision=args.precision, device=args.device, backend=args.backend,
                       internal_batch_size=args.internal_batch_size, memory_budget=args.memory_budget,
                       check_completeness=args.check_completeness, filters=args.filters, mode=args.mode,
                       keep_per_image=args.keep_per_image, resume_dir=args.resume_dir, progress=True,
                       distributed=True)
    elapsed = time.perf_counter() - t0
    if rank != 0:
        return 0
    path = result.save(args.out)
    if args.index_dir:
        _write_index_files(result, args)
    summary = {"out": str(path), "seconds": round(elapsed, 2), "images": sum(result.counts.values()),
               "counts": result.counts, "processes": world, "by": args.by, "top_fraction": args.top,
               "completeness": result.meta.get("completeness")}
    if args.json:
        summary["top"] = {label: _top_units(result, label, args.by, args.top) for label in result.labels}
        print(json.dumps(summary, indent=2))
    else:
        print(_summary_text(result, summary, args.show))
    return 0


def _write_index_files(result, args: argparse.Namespace) -> None:
    from faig_fast.core.attribution import write_index_file

    Path(args.index_dir).mkdir(parents=True, exist_ok=True)
    by = "" if args.by == "filter" else f"_{args.by}"
    for label in result.labels:
        write_index_file(result.top(label, args.top, by=args.by), Path(args.index_dir) / f"{label}{by}_top{args.top:g}.txt")


def _top_units(result, label: str, by: str, fraction: float | None = None, count: int | None = None) -> list[dict]:
    """The top units of ``label`` (Eq. 7) as dicts: rank, the unit's fields (layer, channels, flat index), score."""
    scores = result.scores(label, by=by)
    top = result.top(label, fraction, by=by) if fraction is not None else result.ranking(label, by=by)[:count]
    units = result.units(by)
    return [{"rank": r + 1, **units[i]._asdict(), "score": float(scores[i])} for r, i in enumerate(top.tolist())]


_COLUMNS = {"filter": ("layer", "out_channel", "in_channel"), "channel": ("layer", "channel"), "layer": ("layer", "kind")}
_HEADERS = {"out_channel": "out", "in_channel": "in", "channel": "channel", "kind": "kind", "layer": "layer"}


def _table(rows: list[dict], by: str) -> str:
    """A plain-text table: rank, the unit's columns, score."""
    cols = ("rank", *_COLUMNS[by], "score")
    cells = [[_HEADERS.get(c, c) for c in cols]]
    cells += [[f"{r['score']:.4g}" if c == "score" else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[k]) for row in cells) for k in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) if c == "layer" else v.rjust(w) for v, w, c in zip(row, widths, cols))
                     .rstrip() for row in cells)


def _summary_text(result, summary: dict, show: int) -> str:
    """The human-readable summary: what ran, the completeness check, a top-``show`` table per degradation."""
    counts = ", ".join(f"{l} {n}" for l, n in sorted(result.counts.items()))
    n_units = result.index.num_units(summary["by"])
    lines = [f"FAIG: {summary['images']} images ({counts}) in {summary['seconds']} s on {summary['processes']} "
             f"process(es); result: {summary['out']}"]
    check = summary.get("completeness") or {}
    if check.get("checked"):
        lines.append(f"completeness (Eq. 4): {check['checked']} images checked, {check.get('flagged', 0)} flagged")
    elif check.get("skipped"):
        lines.append(f"completeness (Eq. 4): not checked ({check['skipped']})")
    for label in result.labels:
        lines += ["", f"{label}: top {min(show, n_units)} of {n_units} {summary['by']}s by Eq. 7 score"]
        lines.append(_table(_top_units(result, label, summary["by"], count=show), summary["by"]))
    lines += ["", "(--json prints every top unit; the result file holds all scores)"]
    return "\n".join(lines)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a baseline/target model pair (paper Sec. 5.1)")
    p.add_argument("--arch", default="msrresnet", choices=_arch_choices())
    p.add_argument("--preset", default="tiny")
    p.add_argument("--data", default=str(DEFAULT_DATA / "SunHays80"))
    p.add_argument("--out", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline-iters", type=int, default=None)
    p.add_argument("--finetune-iters", type=int, default=None)
    p.add_argument("--eval", action="store_true", help="print PSNR on Set14 and Set5 afterwards")


def cmd_train(args: argparse.Namespace) -> int:
    from faig_fast.apps.train import train_pair

    out = Path(args.out or f"runs/train-{args.arch}-{args.preset}")
    base, target = train_pair(args.arch, args.preset, args.data, out, seed=args.seed,
                              baseline_iters=args.baseline_iters, finetune_iters=args.finetune_iters)
    print(f"baseline: {base}\ntarget:   {target}")
    if args.eval:
        from faig_fast.analyses.evaluate import psnr_table
        from faig_fast.utils.io import atomic_write_text
        from faig_fast.models import load_model

        models = {"baseline": load_model(base), "target": load_model(target)}
        sets = {n: DEFAULT_DATA / n for n in ("Set14", "Set5") if (DEFAULT_DATA / n).exists()}
        table = psnr_table(models, sets)
        atomic_write_text(out / "psnr.md", table)
        print(table)
    return 0


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="the paper end to end: train → attribute → analyses → report")
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "paper"])
    p.add_argument("--arch", default="msrresnet", choices=_arch_choices(),
                   help="architecture of the pair (its shipped <arch>_<recipe> pair, or one trained here)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--pair-dir", default="auto",
                   help="'auto' (shipped pair if any, else train), 'train', or a folder with baseline/target")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 is best on a busy CPU)")


def cmd_reproduce(args: argparse.Namespace) -> int:
    from faig_fast.apps.reproduce import reproduce

    kw = {"out_dir": Path(args.out)} if args.out else {}
    pair = None if args.pair_dir == "train" else args.pair_dir
    report = reproduce(args.preset, data_root=Path(args.data_root), resume=not args.no_resume, pair_dir=pair,
                       seeds=tuple(args.seeds), threads=args.threads, config={"arch": args.arch}, **kw)
    print(f"report: {report}")
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time the engine against the naive loop; writes JSON")
    p.add_argument("--arch", default="msrresnet")
    p.add_argument("--preset", default="paper")
    p.add_argument("--size", type=int, default=32, help="LR crop size (square)")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--method", default="riemann_left")
    p.add_argument("--cases", nargs="+", default=None, help="subset of cases to run")
    p.add_argument("--device", default=None)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--gl-nodes", type=int, default=FAST_GL_NODES, help="Gauss–Legendre nodes of the loop-gl case")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "fp64"],
                   help="precision of the engine cases (the naive loop stays fp32)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<device>-<time>.json)")
    lam = p.add_argument_group("LAM cases (--lam): the naive per-step loop vs method='lam' vs the fast rule, and "
                               "K windows of one image in one call vs K calls, on a --size LR crop and full Set14 images")
    lam.add_argument("--lam", action="store_true", help="run the LAM cases instead of the FAIG ones")
    lam.add_argument("--pair", default="msrresnet_small", help="LAM: shipped pair (its target is attributed)")
    lam.add_argument("--lam-steps", type=int, default=50, help="LAM: steps of the naive loop and method='lam'")
    lam.add_argument("--windows", type=int, default=16, help="LAM: windows of the K-windows case")
    lam.add_argument("--full-images", type=int, default=1, help="LAM: full Set14 images")


def cmd_bench(args: argparse.Namespace) -> int:
    from faig_fast.apps.bench import run_benchmarks

    if args.lam:
        from faig_fast.apps.lam_bench import run_lam_benchmarks

        path = run_lam_benchmarks(pair=args.pair, size=args.size, full_images=args.full_images, windows=args.windows,
                                  steps=args.lam_steps, device=args.device, precision=args.precision,
                                  repeat=args.repeat, out=args.out)
        print(f"results: {path}")
        return 0
    path = run_benchmarks(arch=args.arch, preset=args.preset, size=args.size, images=args.images,
                          steps=args.steps, method=args.method, cases=args.cases, device=args.device,
                          repeat=args.repeat, gl_nodes=args.gl_nodes, precision=args.precision, out=args.out)
    print(f"results: {path}")
    return 0


def _study_rule(text: str) -> tuple[str, int]:
    """``method/steps`` (e.g. ``gausslegendre/8``) as a tuple, for ``faig study precision --rules``."""
    method, _, steps = text.partition("/")
    if not method or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"rule must be method/steps, e.g. gausslegendre/8; got {text!r}")
    return method, int(steps)


def _add_study(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="accuracy studies: quadrature rules / reduced precision vs a reference")
    p.add_argument("kind", choices=["quadrature", "precision", "lam"],
                   help="lam: fewest Gauss–Legendre nodes of faig_fast.lam that match a converged map")
    p.add_argument("--pair", default="msrresnet_small", help="shipped pair name or a folder with baseline/target")
    p.add_argument("--data", default=str(DEFAULT_DATA / "Set14"))
    p.add_argument("--crop", type=int, default=96, help="GT center crop (0 = full images)")
    p.add_argument("--images", type=int, default=14)
    p.add_argument("--reference-nodes", type=int, default=64)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "tf32", "bf16", "fp64"],
                   help="precision study: precisions to time and compare (fp32 is always run)")
    p.add_argument("--rules", nargs="+", type=_study_rule, default=[("riemann_left", 100), ("gausslegendre", 8)],
                   help="precision study: rules as method/steps (default riemann_left/100 gausslegendre/8)")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/study-<kind>-<pair>.json)")
    p.add_argument("--lam-size", type=int, default=64, help="lam study: LR crop size (0 = full images)")
    p.add_argument("--windows", type=int, default=4, help="lam study: windows per image")
    p.add_argument("--reference-steps", type=int, default=400, help="lam study: steps of the converged map")


def cmd_study(args: argparse.Namespace) -> int:
    import torch

    from faig_fast.data import DegradedImageDataset
    from faig_fast.models import load_model
    from faig_fast.apps.bench import device_name
    from faig_fast.apps.studies import (precision_markdown, precision_study, quadrature_markdown, quadrature_study,
                                        save_json)

    folder = resolve_pair_dir(args.pair)
    if args.kind == "lam":
        from faig_fast.apps.lam_bench import run_lam_study

        path = run_lam_study(pair=str(folder), size=args.lam_size or None, images=args.images, windows=args.windows,
                             reference_steps=args.reference_steps, device=args.device, out=args.out)
        print(f"results: {path}")
        return 0
    a, b = load_model(folder / "baseline.safetensors"), load_model(folder / "target.safetensors")
    ds = DegradedImageDataset(args.data, ("blur", "noise"), scale=b.upscale, seed=0, crop=args.crop or None)
    names = ds.names[: args.images]
    items = [ds[i] for i in range(len(ds)) if ds.item_name(i).split("/")[0] in names]
    if args.kind == "quadrature":
        doc = quadrature_study(a, b, items, reference_nodes=args.reference_nodes, device=args.device)
        print(quadrature_markdown(doc))
        print(f"fewest Gauss–Legendre nodes matching Riemann N=100: {doc['fewest_gl_nodes']}")
    else:
        doc = precision_study(a, b, items, rules=args.rules, precisions=args.precisions,
                              reference_nodes=args.reference_nodes, device=args.device)
        print(precision_markdown(doc))
    doc.update(pair=str(folder), data=args.data, crop=args.crop, images=len(names),
               device=device_name(torch.device(args.device or "cpu")), torch_threads=torch.get_num_threads(),
               torch=torch.__version__, options={k: v for k, v in vars(args).items() if k != "command"})
    out = args.out or results_dir() / f"study-{args.kind}-{folder.name}.json"
    print(f"results: {save_json(doc, out)}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    what = ("attribute the shipped MSRResNet-small pair (faig_fast/assets/pairs/msrresnet_small) on four "
            "photographs bundled with scikit-image, time it against the naive loop, mask the top filters and "
            "write a report")
    p = sub.add_parser("demo", help=what.replace(" (faig_fast/assets/pairs/msrresnet_small)", ""), description=what)
    p.add_argument("--out", default="runs/demo", help="report folder")
    p.add_argument("--steps", type=int, default=100, help="Riemann steps of the timed runs")
    p.add_argument("--max-side", type=int, default=96, help="longest side of the photographs (px)")


def cmd_demo(args: argparse.Namespace) -> int:
    from faig_fast.apps.demo import run_demo

    report = run_demo(Path(args.out), steps=args.steps, max_side=args.max_side)
    print(f"\nDemo report: {report.resolve()}")
    return 0


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="versions, reduction backends; build the extension; check GPU kernels")
    p.add_argument("--build", action="store_true", help="build the C++/CUDA extension now (else PyTorch is used)")
    p.add_argument("--kernels", default=None, metavar="ARCHS",
                   help="compile every Triton kernel and autotune config for these GPUs (e.g. sm_80,sm_90); "
                        "no GPU needed; fails on compile errors and register spills")
    p.add_argument("--full", action="store_true", help="with --kernels: every dtype/size specialisation")
    p.add_argument("--nvcc", action="store_true", help="with --kernels: also compile csrc/*.cu with nvcc")


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import faig_fast
    from faig_fast.ops import extension
    from faig_fast.ops.reduction import available_backends

    if getattr(args, "build", False):
        extension.build_extension()
    print(json.dumps({"faig_fast": faig_fast.__version__, "torch": torch.__version__,
                      "cuda": torch.cuda.is_available(), "reduction_backends": available_backends(),
                      "extension": extension.extension_status()}, indent=2))
    if getattr(args, "build", False) and extension.load_extension(warn=False, build=False) is None:
        return 1
    if getattr(args, "kernels", None):
        from faig_fast.ops.aot import compile_report, nvcc_compile, report_table

        rows = compile_report(args.kernels, full=args.full)
        print(report_table(rows))
        if args.nvcc:
            for arch in args.kernels.split(","):
                doc = nvcc_compile(arch)
                for k in doc["kernels"]:
                    print(f"nvcc {doc['arch']}: {k['name']}: {k['registers']} registers, "
                          f"{k['spill_stores']} bytes spill stores")
        if not all(r.ok for r in rows):
            print(f"{sum(not r.ok for r in rows)} of {len(rows)} kernel compiles failed or spill", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faig", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_attribute(sub)
    _add_train(sub)
    _add_reproduce(sub)
    _add_bench(sub)
    _add_study(sub)
    _add_demo(sub)
    add_lam_parser(sub)
    _add_info(sub)
    return parser


COMMANDS = {"attribute": cmd_attribute, "train": cmd_train, "reproduce": cmd_reproduce, "bench": cmd_bench,
            "study": cmd_study, "demo": cmd_demo, "lam": cmd_lam, "info": cmd_info}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FAIGError as e:
        print(f"faig {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
