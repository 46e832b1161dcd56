"""Accuracy studies behind the engine's defaults: quadrature rules and reduced precision.

``quadrature_study`` measures, on a trained pair, how well each rule / node count reproduces the
top-1% filter sets of a converged integral (Gauss–Legendre with many nodes), and finds the fewest
Gauss–Legendre nodes that agree with it at least as well as the paper's Riemann N = 100 does.
``precision_study`` measures the speed (seconds per source image, all its degradations together) and
the agreement of fp32 / TF32 / bf16 at the paper's rule and at Gauss–Legendre 8, each against the
same converged fp32 integral: the trade-off the README states.  Neither study touches the global RNG.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from torch import nn

from faig_fast.core.api import attribute
from faig_fast.core.completeness import warm_up_calls
from faig_fast.core.attribution import Attribution, jaccard
from faig_fast.errors import InvalidInputError
from faig_fast.utils.io import atomic_write_json

RULES = (("riemann_left", 100), ("riemann_right", 100), ("riemann_middle", 100), ("riemann_trapezoid", 100),
         ("riemann_left", 50), ("riemann_left", 25))
GL_NODES = (2, 3, 4, 6, 8, 12, 16, 24, 32)
PAPER_RULE = ("riemann_left", 100)


def _agreement(result: Attribution, ref: Attribution, fraction: float) -> dict[str, float]:
    return {l: jaccard(result.top(l, fraction), ref.top(l, fraction)) for l in ref.labels}


def quadrature_study(model_a: nn.Module, model_b: nn.Module, items: Sequence, *, reference_nodes: int = 64,
                     fraction: float = 0.01, rules: Sequence[tuple[str, int]] = RULES,
                     gl_nodes: Sequence[int] = GL_NODES, **kwargs) -> dict:
    """Top-``fraction`` Jaccard of every rule against Gauss–Legendre with ``reference_nodes`` nodes."""
    ref = attribute(model_a, model_b, items, steps=reference_nodes, method="gausslegendre",
                    return_convergence_delta=True, **kwargs)
    rows = []
    rules = list(rules) + ([PAPER_RULE] if PAPER_RULE not in rules else [])  # the yardstick is always run
    for method, steps in [*rules, *(("gausslegendre", n) for n in gl_nodes)]:
        t0 = time.perf_counter()
        r = attribute(model_a, model_b, items, steps=steps, method=method, return_convergence_delta=True, **kwargs)
        agree = _agreement(r, ref, fraction)
        rows.append({"method": method, "steps": steps, "seconds": time.perf_counter() - t0, "jaccard": agree,
                     "min_jaccard": min(agree.values()),
                     "mean_convergence_delta": sum(r.convergence_delta) / len(r.convergence_delta)})
    paper = next(r for r in rows if (r["method"], r["steps"]) == PAPER_RULE)
    gl = sorted((r["steps"], r["min_jaccard"] >= paper["min_jaccard"]) for r in rows if r["method"] == "gausslegendre")
    # the fewest nodes from which on every larger count also agrees at least as well as Riemann N=100
    enough = [n for i, (n, ok) in enumerate(gl) if all(o for _, o in gl[i:])]
    return {"reference": f"gausslegendre/{reference_nodes}", "fraction": fraction, "rows": rows,
            "reference_convergence_delta": sum(ref.convergence_delta) / len(ref.convergence_delta),
            "paper_rule_min_jaccard": paper["min_jaccard"], "fewest_gl_nodes": min(enough) if enough else None}


PRECISION_RULES = (("riemann_left", 100), ("gausslegendre", 8))


def _timed(model_a: nn.Module, model_b: nn.Module, items: Sequence, method: str, steps: int, precision: str,
           **kwargs) -> tuple[Attribution, float]:
    """One attribution and its wall-clock seconds, after a 2-node warm-up on one image at that precision."""
    with warm_up_calls():
        attribute(model_a, model_b, items[:1], steps=2, method="gausslegendre", precision=precision, **kwargs)
    t0 = time.perf_counter()
    r = attribute(model_a, model_b, items, steps=steps, method=method, precision=precision, **kwargs)
    return r, time.perf_counter() - t0


def _check_images(images: int | None, entries: int) -> None:
    """``images`` is None or an integer from 1 to the number of (image, degradation) items."""
    if images is not None and (isinstance(images, bool) or not isinstance(images, int) or not 1 <= images <= entries):
        raise InvalidInputError(f"precision_study: images must be an integer from 1 to the {entries} items; "
                                f"got {images!r}")


def precision_study(model_a: nn.Module, model_b: nn.Module, items: Sequence, *,
                    rules: Sequence[tuple[str, int]] = PRECISION_RULES, precisions: Sequence[str] = ("fp32", "bf16"),
                    reference_nodes: int = 64, fraction: float = 0.01, images: int | None = None, **kwargs) -> dict:
    """Speed and top-``fraction`` agreement of each precision × rule against a converged fp32 integral.

    The reference is Gauss–Legendre with ``reference_nodes`` nodes in fp32.  Each row has the seconds
    (total, and per source image), the speed-up over fp32 at the same rule, and the Jaccard of the
    top sets against the reference and against fp32 at the same rule.  ``images`` is the number of
    source images the (image, degradation) items come from; by default the largest number of items
    under one label, which is that count when every image appears once per degradation (as in
    ``DegradedImageDataset``).
    """
    items = list(items)
    _check_images(images, len(items))
    ref, ref_s = _timed(model_a, model_b, items, "gausslegendre", reference_nodes, "fp32", **kwargs)
    n_images = images if images is not None else max(ref.counts.values())
    rows = []
    for method, steps in rules:
        fp32, fp32_s = None, None
        for p in dict.fromkeys(["fp32", *precisions]):  # fp32 first: the others are compared with it
            r, sec = _timed(model_a, model_b, items, method, steps, p, **kwargs)
            fp32, fp32_s = (r, sec) if p == "fp32" else (fp32, fp32_s)
            agree = _agreement(r, ref, fraction)
            vs32 = _agreement(r, fp32, fraction)
            rows.append({"rule": f"{method}/{steps}", "method": method, "steps": steps, "precision": p,
                         "seconds": sec, "seconds_per_image": sec / n_images, "speedup_vs_fp32": fp32_s / sec,
                         "jaccard_vs_converged": agree, "min_jaccard_vs_converged": min(agree.values()),
                         "jaccard_vs_fp32_same_rule": vs32, "min_jaccard_vs_fp32_same_rule": min(vs32.values())})
    rows = [r for r in rows if r["precision"] in precisions]
    return {"reference": f"gausslegendre/{reference_nodes} fp32", "reference_seconds": ref_s, "fraction": fraction,
            "images": n_images, "entries": len(items), "rows": rows}


def precision_markdown(study: dict) -> str:
    """The README table for a precision study.

    Seconds per image are recomputed as ``seconds / study["images"]`` (the source images, each under
    every degradation), so files written before ``seconds_per_image`` meant that render right too.
    """
    lines = ["| rule | precision | s / image | speed-up vs fp32 | min top-1% Jaccard vs converged | "
             "vs fp32 same rule |", "| --- | --- | --- | --- | --- | --- |"]
    for r in study["rows"]:
        per_image = r["seconds"] / study["images"]
        lines.append(f"| {r['rule']} | {r['precision']} | {per_image:.3f} | {r['speedup_vs_fp32']:.2f}x | "
                     f"{r['min_jaccard_vs_converged']:.3f} | {r['min_jaccard_vs_fp32_same_rule']:.3f} |")
    return "\n".join(lines)


def quadrature_markdown(study: dict) -> str:
    """The README table for a quadrature study."""
    labels = sorted(study["rows"][0]["jaccard"])
    head = "| rule | nodes | " + " | ".join(f"top-1% Jaccard ({l})" for l in labels) + " | mean conv. delta |"
    lines = [head, "| --- | --- | " + "--- | " * len(labels) + "--- |"]
    for r in study["rows"]:
        cells = " | ".join(f"{r['jaccard'][l]:.3f}" for l in labels)
        lines.append(f"| {r['method']} | {r['steps']} | {cells} | {r['mean_convergence_delta']:.2e} |")
    return "\n".join(lines)


def save_json(doc: dict, path: str | Path) -> Path:
    """Write a study's JSON atomically."""
    return atomic_write_json(path, doc)
