"""Accuracy studies behind the engine's defaults: quadrature rules and reduced precision.

``quadrature_study`` measures, on a trained pair, how well each rule / node count reproduces the
top-1% filter sets of a converged integral (Gauss–Legendre with many nodes), and finds the fewest
Gauss–Legendre nodes that agree with it at least as well as the paper's Riemann N = 100 does.
``precision_study`` does the same for TF32 / bf16 against fp32.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from torch import nn

from faig_fast.core.api import attribute
from faig_fast.core.attribution import Attribution, jaccard
from faig_fast.utils.io import atomic_write_json

RULES = (("riemann_left", 100), ("riemann_right", 100), ("riemann_middle", 100), ("riemann_trapezoid", 100),
         ("riemann_left", 50), ("riemann_left", 25))
GL_NODES = (2, 3, 4, 6, 8, 12, 16, 24, 32)


def _agreement(result: Attribution, ref: Attribution, fraction: float) -> dict[str, float]:
    return {l: jaccard(result.top(l, fraction), ref.top(l, fraction)) for l in ref.labels}


def quadrature_study(model_a: nn.Module, model_b: nn.Module, items: Sequence, *, reference_nodes: int = 64,
                     fraction: float = 0.01, rules: Sequence[tuple[str, int]] = RULES,
                     gl_nodes: Sequence[int] = GL_NODES, **kwargs) -> dict:
    """Top-``fraction`` Jaccard of every rule against Gauss–Legendre with ``reference_nodes`` nodes."""
    ref = attribute(model_a, model_b, items, steps=reference_nodes, method="gausslegendre",
                    return_convergence_delta=True, **kwargs)
    rows = []
    for method, steps in [*rules, *(("gausslegendre", n) for n in gl_nodes)]:
        t0 = time.perf_counter()
        r = attribute(model_a, model_b, items, steps=steps, method=method, return_convergence_delta=True, **kwargs)
        agree = _agreement(r, ref, fraction)
        rows.append({"method": method, "steps": steps, "seconds": time.perf_counter() - t0, "jaccard": agree,
                     "min_jaccard": min(agree.values()),
                     "mean_convergence_delta": sum(r.convergence_delta) / len(r.convergence_delta)})
    paper = next(r for r in rows if (r["method"], r["steps"]) == ("riemann_left", 100))
    gl = sorted((r["steps"], r["min_jaccard"] >= paper["min_jaccard"]) for r in rows if r["method"] == "gausslegendre")
    # the fewest nodes from which on every larger count also agrees at least as well as Riemann N=100
    enough = [n for i, (n, ok) in enumerate(gl) if all(o for _, o in gl[i:])]
    return {"reference": f"gausslegendre/{reference_nodes}", "fraction": fraction, "rows": rows,
            "reference_convergence_delta": sum(ref.convergence_delta) / len(ref.convergence_delta),
            "paper_rule_min_jaccard": paper["min_jaccard"], "fewest_gl_nodes": min(enough) if enough else None}


def precision_study(model_a: nn.Module, model_b: nn.Module, items: Sequence, *, steps: int = 100,
                    method: str = "riemann_left", precisions: Sequence[str] = ("bf16",), fraction: float = 0.01,
                    **kwargs) -> dict:
    """Top-``fraction`` Jaccard of reduced precisions against fp32 at the same rule."""
    t0 = time.perf_counter()
    ref = attribute(model_a, model_b, items, steps=steps, method=method, precision="fp32", **kwargs)
    rows = [{"precision": "fp32", "seconds": time.perf_counter() - t0, "jaccard": {l: 1.0 for l in ref.labels},
             "min_jaccard": 1.0}]
    for p in precisions:
        t0 = time.perf_counter()
        r = attribute(model_a, model_b, items, steps=steps, method=method, precision=p, **kwargs)
        agree = _agreement(r, ref, fraction)
        rows.append({"precision": p, "seconds": time.perf_counter() - t0, "jaccard": agree,
                     "min_jaccard": min(agree.values())})
    return {"rule": f"{method}/{steps}", "fraction": fraction, "rows": rows}


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
