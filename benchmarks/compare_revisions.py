"""Time ``faig_fast.attribute`` at another git revision and at the working tree, alternately, on one machine.

``python benchmarks/compare_revisions.py REV --out benchmarks/results/regression-vs-REV.json`` checks that a
change did not slow the engine down: MSRResNet 16×64 ×2 (random-init pair, seed 0, target = baseline + 2%
noise), 2 random 32×32 LR images × {blur, noise}, Riemann-left ``--steps`` nodes, default strategy; each
timing in a fresh process, the two revisions alternating ``--rounds`` times so drift hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, time, torch
from faig_fast import attribute
from faig_fast.models import create_model
torch.manual_seed(0)
a = create_model("msrresnet", preset="paper", upscale=2).eval()
b = create_model("msrresnet", preset="paper", upscale=2).eval()
b.load_state_dict({k: v + 0.02 * v.std() * torch.randn_like(v) if v.is_floating_point() else v
                   for k, v in a.state_dict().items()})
g = torch.Generator().manual_seed(1)
items = [(torch.rand(3, 32, 32, generator=g), torch.rand(3, 64, 64, generator=g), l) for l in ("blur", "noise")]
attribute(a, b, items[:1], steps=2)
t = time.perf_counter()
attribute(a, b, items, steps=int(sys.argv[1]))
print(time.perf_counter() - t)
"""


def _time(tree: Path, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    probe = subprocess.run([sys.executable, "-c", "import faig_fast; print(faig_fast.__file__)"], cwd=tree, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not probe.startswith(str(tree)):
        raise SystemExit(f"{tree}: imported faig_fast from {probe}, not from this tree")
    out = subprocess.run([sys.executable, "-c", CHILD, str(steps)], cwd=tree, env=env,
                         capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), args.rev], cwd=ROOT, check=True)
        try:
            times: dict[str, list[float]] = {args.rev: [], "working tree": []}
            for _ in range(args.rounds):
                times[args.rev].append(_time(old, args.steps))
                times["working tree"].append(_time(ROOT, args.steps))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=True)
    doc = {"rev": args.rev, "steps": args.steps, "rounds": args.rounds, "seconds": times,
           "best": {k: min(v) for k, v in times.items()},
           "ratio_new_over_old": min(times["working tree"]) / min(times[args.rev])}
    if args.out:
        sys.path.insert(0, str(ROOT))
        from faig_fast.utils.io import atomic_write_json

        atomic_write_json(args.out, doc)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
