"""Time of the first and the second ``faig_fast.attribute()`` call in a fresh process (issue 10, item 4).

Run it in a fresh venv right after ``pip install``:  ``python benchmarks/first_call.py``  — it prints one
JSON line.  By default the C++ extension cache points to an empty temporary folder, as on a fresh install
(``--keep-cache`` uses the real one).  The call attributes the shipped tiny MSRResNet pair on two 32×32
LR crops of the bundled demo photographs, 100 Riemann steps, backend ``auto``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def _child() -> dict:
    t0 = time.perf_counter()
    import faig_fast
    from faig_fast.data import DegradedImageDataset, demo_images
    from faig_fast.models import load_model
    from faig_fast.ops import extension
    from faig_fast.utils.paths import shipped_pair_dir

    t_import = time.perf_counter() - t0
    pair = shipped_pair_dir("msrresnet_tiny")
    a, b = load_model(pair / "baseline.safetensors"), load_model(pair / "target.safetensors")
    ds = DegradedImageDataset(demo_images(("astronaut",)), ("blur", "noise"), scale=2, seed=0, crop=64)
    items = [ds[i] for i in range(len(ds))]
    times = []
    for _ in range(2):
        t = time.perf_counter()
        faig_fast.attribute(a, b, items, steps=100)
        times.append(time.perf_counter() - t)
    return {"import_s": t_import, "first_call_s": times[0], "second_call_s": times[1],
            "extension": extension.extension_status(), "faig_fast": faig_fast.__version__}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep-cache", action="store_true", help="use the real extension cache, not an empty one")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="also write the JSON here (atomically)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child()))
        return
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.keep_cache:
            env["FAIG_FAST_EXT_DIR"] = tmp
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
    doc = json.loads(out)
    doc["process_s"] = time.perf_counter() - t0
    doc["fresh_extension_cache"] = not args.keep_cache
    if args.out:
        from faig_fast.utils.io import atomic_write_json

        atomic_write_json(args.out, doc)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
