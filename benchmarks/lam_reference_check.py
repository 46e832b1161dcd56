"""Outside-oracle check of ``faig_fast.lam(method="lam")`` against the LAM reference code itself.

Runs the reference's own ``GaussianBlurPath`` / ``Path_gradient`` / ``attr_grad`` / ``gini`` (a
checkout of github.com/X-Lowlevel-Vision/LAM_Demo, not part of this repository) and ``faig_fast.lam``
on the shipped tiny pairs and a Set5 crop, and writes the largest map difference and both DIs:

    python benchmarks/lam_reference_check.py --reference /path/to/LAM_Demo --out benchmarks/results/lam-reference-check.json

Two shims let the 2020 code run on current PyTorch without editing it: ``ModelZoo.utils`` (which
imports torchvision only for helpers Path_gradient does not use) is replaced by its two batch
helpers, and ``np.asarray`` of the list of outputs (tensors that require grad, an error today)
detaches them first.
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

import numpy as np
import torch

import faig_fast
from faig_fast.data.images import read_image
from faig_fast.models import load_model
from faig_fast.utils.io import atomic_write_json
from faig_fast.utils.paths import data_root, shipped_pair_dir


def _load_reference(folder: Path) -> types.SimpleNamespace:
    shim = types.ModuleType("ModelZoo.utils")
    shim._add_batch_one = lambda t: t.view((1,) + tuple(t.shape))
    shim._remove_batch = lambda t: t[0, ...]
    sys.modules.setdefault("ModelZoo", types.ModuleType("ModelZoo"))
    sys.modules["ModelZoo.utils"] = shim
    sys.path.insert(0, str(folder))
    from SaliencyModel import BackProp
    from SaliencyModel.attributes import attr_grad
    from SaliencyModel.utils import gini, grad_abs_norm

    class _Numpy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def asarray(x, *a, **k):
            if isinstance(x, list):
                x = [t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t for t in x]
            return np.asarray(x, *a, **k)

    BackProp.np = _Numpy("numpy")
    return types.SimpleNamespace(path=BackProp.GaussianBlurPath, grads=BackProp.Path_gradient,
                                 objective=BackProp.attribution_objective, attr_grad=attr_grad, gini=gini,
                                 norm=grad_abs_norm)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", required=True, help="a LAM_Demo checkout")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    ref = _load_reference(Path(args.reference))
    hr = read_image(data_root() / "Set5" / "baby.png", 3)[:, 100:148, 120:168]
    lr = torch.nn.functional.interpolate(hr[None], scale_factor=0.5, mode="bicubic", antialias=True).clamp(0, 1)[0]
    rows = []
    for pair in ("msrresnet_tiny", "srcnn_style_tiny"):
        model = load_model(shipped_pair_dir(pair) / "target.safetensors").eval()
        for window in ((14, 18, 16), (0, 0, 8), (30, 10, 12)):
            row, col, size = window
            grads, _, _ = ref.grads(lr.numpy(), model, ref.objective(ref.attr_grad, row, col, window=size),
                                    ref.path(1.2, 50, 9), cuda=False)
            ref_map = grads.mean(axis=0)  # saliency_map_PG
            ref_di = float((1 - ref.gini(ref.norm(ref_map))) * 100)
            ours = faig_fast.lam(model, lr, window, steps=50, method="lam")
            diff = float(np.abs(ours.attribution.double().numpy() - ref_map).max() / np.abs(ref_map).max())
            rows.append({"pair": pair, "window": list(window), "max_abs_diff_over_max_abs": diff,
                         "di": ours.diffusion_index, "di_reference": ref_di})
            print(rows[-1])
    if args.out:
        atomic_write_json(args.out, {"image": "Set5/baby.png crop 48x48 HR, bicubic /2", "steps": 50, "rows": rows,
                                     "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
