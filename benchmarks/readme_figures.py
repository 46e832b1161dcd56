"""Render the README's result tables from the committed result files, or check that they match.

Every figure table in README.md sits between two markers that name its source::

    <!-- figures: bench benchmarks/results/cpu-....json -->
    | ... generated table ... |
    <!-- /figures -->

``python benchmarks/readme_figures.py --write`` regenerates every block from its file;
``--check`` (run by the test suite) fails when a block differs from what its file gives, so no
README figure can drift from the measurement it quotes.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- figures: (\w+) (\S+) -->\n)(.*?)(<!-- /figures -->)", re.S)


def _fmt_jaccard(j: dict | None) -> str:
    if not j:
        return "–"
    return " / ".join(f"{j[k]:.3f}".rstrip("0").rstrip(".") if j[k] != 1 else "1" for k in sorted(j))


def _bench(doc: dict) -> str:
    """Engine vs naive loop: one row per timed case, then the per-filter reductions."""
    rows = [f"{doc['device']}, torch {doc['torch']}; {doc['arch']} `{doc['preset']}`, {doc['images']} images "
            f"(LQ crop {doc['lq_crop']}), engine precision {doc.get('precision', 'fp32')}"
            + (f", best of {doc['repeat']} runs per case" if doc.get("repeat", 1) > 1 else "") + ".", "",
            "| case | rule | seconds | speed-up vs naive | top-1% Jaccard vs naive (blur / noise) | "
            "GFLOP/s | % of peak FLOP/s | peak memory |",
            "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in doc["results"]:
        if r["case"].startswith("reduce-") or "seconds" not in r:
            continue
        sp = r.get("speedup_vs_naive")
        rl = r.get("roofline", {})
        flops = rl.get("achieved_tflop_s", r.get("achieved_tflop_s"))
        frac = rl.get("fraction_of_peak_flops")
        rows.append(
            f"| `{r['case']}` | {r['method']} {r['steps']} | {r['seconds']:.2f} | {'–' if sp is None else f'{sp:.2f}×'} | "
            f"{_fmt_jaccard(r.get('jaccard_top1_vs_naive'))} | {'–' if flops is None else f'{flops * 1000:.0f}'} | "
            f"{'–' if frac is None else f'{frac:.0%}'} | {r['peak_memory_mb']:.0f} MiB |")
    red = [r for r in doc["results"] if r["case"].startswith("reduce-") and "seconds" in r]
    if red:
        rows += ["", "| per-filter reduction (4 images × all filters) | ms per call |", "| --- | ---: |"]
        rows += [f"| `{r['case']}` | {r['seconds'] * 1000:.2f} |" for r in red]
    return "\n".join(rows)


def _regression(doc: dict) -> str:
    rows = ["| code | seconds (best of {}) |".format(doc["rounds"]), "| --- | ---: |"]
    rows += [f"| {k} | {v:.2f} |" for k, v in doc["best"].items()]
    return "\n".join(rows) + f"\n\nThis code / {doc['rev']}: **{doc['ratio_new_over_old']:.2f}×** the time."


def _first_call(doc: dict) -> str:
    return ("| import | first `attribute()` | second `attribute()` | C++ extension |\n| ---: | ---: | ---: | --- |\n"
            f"| {doc['import_s']:.2f} s | {doc['first_call_s']:.2f} s | {doc['second_call_s']:.2f} s | "
            f"{doc['extension']} |")


def _quadrature(doc: dict) -> str:
    from faig_fast.apps.studies import quadrature_markdown

    return (quadrature_markdown(doc) + "\n\nFewest Gauss–Legendre nodes from which on every node count agrees with "
            f"the converged integral at least as well as the paper's rule: **{doc['fewest_gl_nodes']}**.")


def _precision(doc: dict) -> str:
    from faig_fast.apps.studies import precision_markdown

    labels = sorted(doc["rows"][0]["jaccard_vs_converged"])
    host = f"{doc['device']}, torch {doc['torch']}; " if "device" in doc and "torch" in doc else ""
    return (f"{host}reference: {doc['reference']}; {doc['images']} images × {{{', '.join(labels)}}} "
            f"({doc['images'] * len(labels)} attributions per run); s / image = a run's seconds / {doc['images']}."
            "\n\n" + precision_markdown(doc))


def _lam_bench(doc: dict) -> str:
    """LAM cases per input: seconds, speed-up against the naive per-step loop, agreement, memory."""
    rows = [f"{doc['device']}, torch {doc['torch']}, {doc.get('torch_threads', '?')} threads; "
            f"target of `{doc['pair']}`.", ""]
    names = {"naive": "naive loop (reference structure)", "lam": "`method=\"lam\"` (exact)",
             "fast": "fast rule", "windows_one_call": "K windows, one call", "windows_single_calls": "K windows, K calls"}
    rows += ["| input | case | rule | seconds | speed-up | Pearson r vs exact | DI − DI(exact) | peak RSS |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for run in doc["runs"]:
        where = f"{run['input']} `{run['image']}` {run['image_shape'][-2]}×{run['image_shape'][-1]} LR"
        for case, c in run["cases"].items():
            rule = run["fast_rule"] if case == "fast" else f"lam/{run['steps']}"
            if case.startswith("windows"):
                rule += f" × {c['windows']} windows"
            sp = c.get("speedup_vs_naive")
            sp = f"{sp:.2f}×" if sp is not None else "–"
            if "speedup_vs_single_calls" in c:
                sp = f"{c['speedup_vs_single_calls']:.2f}× vs K calls"
            r = c.get("pearson_r", c.get("min_pearson_r_vs_single"))
            ddi = c.get("di_difference")
            rows.append(f"| {where} | {names.get(case, case)} | {rule} | {c['seconds']:.2f} | "
                        f"{sp} | {'–' if r is None else f'{r:.5f}'} | "
                        f"{'–' if ddi is None else f'{ddi:+.3f}'} | {c['peak_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(rows)


def _lam_study(doc: dict) -> str:
    from faig_fast.apps.lam_bench import lam_study_markdown

    return (f"{len(doc['images'])} Set14 images ({doc['size']}×{doc['size']} LR crops) × {doc['windows_per_image']} "
            f"windows of {doc['window_size']} px, target of `{Path(doc['pair']).name}`.\n\n" + lam_study_markdown(doc).strip())


def _lam_reference(doc: dict) -> str:
    rows = ["| pair | window (row, col, size) | max \\|ours − reference\\| / max \\|reference\\| | DI (ours) | DI (reference) |",
            "| --- | --- | ---: | ---: | ---: |"]
    rows += [f"| `{r['pair']}` | {tuple(r['window'])} | {r['max_abs_diff_over_max_abs']:.1e} | {r['di']:.4f} | "
             f"{r['di_reference']:.4f} |" for r in doc["rows"]]
    return "\n".join(rows)


def _findings(report: str) -> str:
    """The qualitative-findings checklist of a ``faig reproduce`` report, verbatim."""
    part = report.split("## Do the paper's qualitative findings hold here?", 1)[1].split("\n## ", 1)[0]
    return part.strip()


def _markdown(text: str) -> str:
    """A generated Markdown file (e.g. ``faig lam --data``'s ``lam_dataset.md``), verbatim."""
    return text.strip()


def _json_block(doc: dict) -> str:
    return "```json\n" + json.dumps(doc, indent=1, sort_keys=True) + "\n```"


RENDERERS: dict[str, Callable[[dict], str]] = {
    "bench": _bench, "quadrature": _quadrature, "precision": _precision, "first_call": _first_call, "regression": _regression,
    "findings": _findings, "json": _json_block, "lam_bench": _lam_bench, "lam_study": _lam_study,
    "lam_reference": _lam_reference, "markdown": _markdown,
}


def render(readme: str, root: Path = ROOT) -> str:
    """README text with every figures block regenerated from its source file."""
    def one(m: re.Match) -> str:
        kind, src = m.group(2), m.group(3)
        if kind not in RENDERERS:
            raise SystemExit(f"README: unknown figures kind {kind!r} (known: {sorted(RENDERERS)})")
        path = root / src
        if not path.is_file():
            raise SystemExit(f"README: figures source {src} does not exist")
        text = path.read_text()
        return m.group(1) + RENDERERS[kind](json.loads(text) if path.suffix == ".json" else text) + "\n" + m.group(5)
    return BLOCK.sub(one, readme)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 when a block differs from its file")
    mode.add_argument("--write", action="store_true", help="regenerate every block in place")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args(argv)
    path = Path(args.readme)
    old = path.read_text()
    new = render(old, path.parent)
    if args.write:
        path.write_text(new)
        print(f"{path}: {len(BLOCK.findall(new))} figure blocks written")
        return 0
    if new != old:
        print(f"{path}: figure blocks differ from their result files; run "
              "`python benchmarks/readme_figures.py --write`", file=sys.stderr)
        return 1
    print(f"{path}: {len(BLOCK.findall(new))} figure blocks match their result files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
