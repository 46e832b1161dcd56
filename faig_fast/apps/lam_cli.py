"""``faig lam``: local attribution maps and the diffusion index from the command line.

* one image: ``faig lam --model M.safetensors --image lr.png --window ROW,COL,SIZE --out DIR`` writes
  the map (safetensors), ``lam.json`` and the paper-style figure;
* a folder: ``faig lam --model M --data DIR --windows K --out DIR`` (K seeded windows per image on
  textured regions; resumable; ``torchrun``-sharded);
* two models on the same windows: ``--model A --model B`` or a FAIG pair ``--baseline B --target T``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from faig_fast.core.blur_path import DEFAULT_KERNEL_SIZE, DEFAULT_SIGMA
from faig_fast.errors import InvalidInputError

METHOD_CHOICES = ("lam", "gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def _window(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"window must be ROW,COL,SIZE (integers), got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def add_lam_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``faig lam`` on the ``faig`` command's subparsers."""
    p = subparsers.add_parser("lam", help="local attribution maps (LAM) and diffusion index of one or two models")
    p.add_argument("--model", action="append", default=None, metavar="PATH",
                   help="checkpoint (safetensors or .pth); give it twice to compare two models")
    p.add_argument("--baseline", default=None, help="a FAIG pair's baseline (with --target): both are compared")
    p.add_argument("--target", default=None, help="a FAIG pair's target (with --baseline)")
    p.add_argument("--arch", default=None, help="architecture for checkpoints without metadata ('auto' detects it)")
    p.add_argument("--model-class", default=None, metavar="PACKAGE.MODULE:CLASS",
                   help="build your own architecture for plain state-dict checkpoints (importable module)")
    p.add_argument("--model-kwargs", default=None, metavar="JSON", help="constructor arguments as a JSON object")
    p.add_argument("--image", default=None, help="one input image (the model's input, e.g. an LR image)")
    p.add_argument("--window", action="append", type=_window, default=None, metavar="ROW,COL,SIZE",
                   help="output window (top-left row, column and side, in output pixels); repeatable")
    p.add_argument("--data", default=None, help="dataset mode: a folder of images")
    p.add_argument("--windows", type=int, default=4, help="dataset mode: windows per image (seeded, textured)")
    p.add_argument("--window-size", type=int, default=16, help="dataset mode: window side in output pixels")
    p.add_argument("--input", default=None, choices=["hr", "lr"],
                   help="images are ground truth (input = their bicubic ÷scale, as the LAM paper) or model inputs "
                        "(default: lr for --image, hr for --data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--no-resume", action="store_true", help="dataset mode: recompute every image")
    p.add_argument("--gray", action="store_true", help="1-channel images, for gray models")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--method", default="lam", choices=METHOD_CHOICES,
                   help="'lam': the reference's discretisation; others: quadrature with the analytic derivative")
    p.add_argument("--sigma", type=float, default=DEFAULT_SIGMA, help="σ₀ of the blur path")
    p.add_argument("--kernel-size", type=int, default=DEFAULT_KERNEL_SIZE, help="l, the blur kernel's side (odd)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16", "fp64"])
    p.add_argument("--device", default=None)
    p.add_argument("--mode", default="eval", choices=["eval", "train", "as-is"])
    p.add_argument("--internal-batch-size", type=int, default=None, help="most nodes in one batched pass")
    p.add_argument("--out", default="runs/lam")
    return p


def load_models(args: argparse.Namespace) -> dict[str, object]:
    """The models to attribute, by display name: ``--model`` paths (file stems) or ``baseline``/``target``."""
    from faig_fast.apps.model_args import model_loader

    paths: list[tuple[str, str]] = []
    if args.model:
        paths += [(Path(m).stem, m) for m in args.model]
    if args.baseline or args.target:
        if not (args.baseline and args.target):
            raise InvalidInputError("--baseline and --target go together")
        paths += [("baseline", args.baseline), ("target", args.target)]
    if not paths:
        raise InvalidInputError("give --model PATH (once or twice) or --baseline B --target T")
    names = [n for n, _ in paths]
    if len(set(names)) != len(names):
        paths = [(f"{n}_{i + 1}", p) for i, (n, p) in enumerate(paths)]
    load = model_loader(args)
    return {n: load(p) for n, p in paths}


def _single(args: argparse.Namespace, models: dict[str, object]) -> dict:
    """One image: every model's LAM of every window; files under ``--out``."""
    from faig_fast.core.lam_figures import lam_grid_figure
    from faig_fast.core.lam import LocalAttributor
    from faig_fast.data.images import read_image
    from faig_fast.utils.io import atomic_write_json

    if not args.window:
        raise InvalidInputError("--image needs at least one --window ROW,COL,SIZE")
    out = Path(args.out)
    image = read_image(args.image, 1 if args.gray else 3)
    if args.input == "hr":
        from faig_fast.data.degradations import bicubic_down

        from faig_fast.apps.lam_runs import common_scale

        image = bicubic_down(image, common_scale(models, image.shape[0]))
    t0 = time.perf_counter()
    doc: dict = {"image": str(args.image), "results": []}
    grid_rows = [{"name": Path(args.image).name, "window": w, "maps": {}} for w in args.window]
    several = len(models) > 1 or len(args.window) > 1
    for mname, model in models.items():
        att = LocalAttributor(model, steps=args.steps, method=args.method, sigma=args.sigma,
                              kernel_size=args.kernel_size, device=args.device, precision=args.precision,
                              internal_batch_size=args.internal_batch_size, mode=args.mode)
        results = att.attribute([image], [args.window], progress=True, names=[str(args.image)])[0]
        for k, r in enumerate(results):
            stem = "lam" + (f"_{mname}_w{k}" if several else "")
            r.save(out / f"{stem}.safetensors")
            r.save_figure(out / f"{stem}.png")
            doc["results"].append({"model": mname, "map": f"{stem}.safetensors", "figure": f"{stem}.png",
                                   **r.summary()})
            grid_rows[k].update(image=r.image, output=r.output)
            grid_rows[k]["maps"][mname] = (r.attribution, r.diffusion_index)
    doc["seconds"] = time.perf_counter() - t0
    if not several:
        doc.update({k: doc["results"][0][k] for k in ("diffusion_index", "completeness", "nan_gradients")})
    elif len(models) > 1:
        lam_grid_figure(grid_rows, out / "lam_grid.png")
        doc["grid"] = "lam_grid.png"
    atomic_write_json(out / "lam.json", doc)
    return doc


def cmd_lam(args: argparse.Namespace) -> int:
    """Run ``faig lam`` (single image or dataset mode)."""
    from faig_fast.apps.runs import finish_distributed, init_distributed

    if (args.image is None) == (args.data is None):
        raise InvalidInputError("give exactly one of --image (one image) or --data (a folder)")
    models = load_models(args)
    if args.image is not None:
        doc = _single(args, models)
        print(json.dumps({"out": args.out, "seconds": round(doc["seconds"], 3),
                          "diffusion_index": {f"{r['model']} {tuple(r['window'])}": r["diffusion_index"]
                                              for r in doc["results"]}}, indent=2))
        return 0
    rank, _ = init_distributed()
    done = False
    try:
        doc = _dataset(args, models)
        done = True
    finally:
        finish_distributed(wait=done)
    if rank == 0 and doc is not None:
        print(json.dumps({"out": args.out, "overall": doc["overall"], **({"difference": doc["difference"]}
                                                                         if "difference" in doc else {})}, indent=2))
    return 0


def _dataset(args: argparse.Namespace, models: dict[str, object]) -> dict | None:
    from faig_fast.apps.lam_runs import LamSettings, lam_dataset

    if args.window:
        raise InvalidInputError("--window is for --image; with --data the windows are chosen (--windows K)")
    if args.windows < 1:
        raise InvalidInputError(f"--windows must be >= 1, got {args.windows}")
    settings = LamSettings(windows=args.windows, window_size=args.window_size, seed=args.seed,
                           input=args.input or "hr",
                           channels=1 if args.gray else 3, steps=args.steps, method=args.method, sigma=args.sigma,
                           kernel_size=args.kernel_size, precision=args.precision, mode=args.mode,
                           device=args.device, internal_batch_size=args.internal_batch_size)
    return lam_dataset(models, args.data, args.out, settings, resume=not args.no_resume,
                       max_images=args.max_images)
