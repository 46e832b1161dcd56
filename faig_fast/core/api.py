"""``faig_fast.attribute``: the entry point other research code calls, and the one that ``faig
attribute`` calls: both run :func:`faig_fast.core.run_loop.run` over an
:class:`~faig_fast.core.attributor.Attributor`."""
from __future__ import annotations

import os
from typing import Iterable

import torch
from torch import nn

from faig_fast.core.attribution import Attribution
from faig_fast.core.attributor import Attributor
from faig_fast.core.run_loop import run


def attribute(model_a: nn.Module, model_b: nn.Module, loader: Iterable, *, steps: int = 100,
              method: str = "riemann_left", device: torch.device | str | None = None, strategy: str = "auto",
              precision: str = "fp32", internal_batch_size: int | None = None, memory_budget: int | None = None,
              backend: str = "auto", keep_per_image: bool = False, return_convergence_delta: bool = False,
              progress: bool = False, filters: str = "conv", mode: str = "eval",
              check_completeness: bool = True, resume_dir: str | os.PathLike | None = None,
              distributed: bool = False) -> Attribution:
    """FAIG of every filter between baseline ``model_a`` (θ̄) and target ``model_b`` (θ).

    ``loader`` yields ``(lq, gt, label[, name])`` tuples or dicts (tensors CHW or BCHW in [0, 1], any
    channel count; ``label`` a string or one string per sample), each one batch; or it is a map-style
    dataset of single images (a ``torch.utils.data.Dataset`` such as
    :class:`~faig_fast.data.DegradedImageDataset`), run in consecutive batches of equal size (at most
    8) with images named by its ``item_name``.  Images without a name are ``image<position>``.

    The model's scale is its ``upscale`` or ``scale`` attribute, else inferred from one forward pass
    (1 for denoisers).  ``steps`` and ``method`` choose the quadrature of Eq. 5 (``riemann_left`` with
    100 steps is the paper's Eq. 6).  ``strategy`` picks the engine (``loop``, ``vmap``, ``linear``,
    ``persample``, ``tune``; ``auto`` is ``loop`` on CPU and ``tune`` on GPU), ``precision`` one of
    ``fp32``, ``tf32``, ``bf16``, ``fp64``.  ``internal_batch_size`` caps the steps (and images, for
    ``vmap``) run in one batched pass; by default chunks are planned from free memory or
    ``memory_budget`` bytes.  ``backend`` picks the per-filter reduction (``auto``, ``torch``, ``cpp``,
    ``triton``, ``cuda``).  ``filters`` is ``"conv"`` (the paper's K×K conv slices) or
    ``"conv+linear"``; ``mode`` (``"eval"``, ``"train"``, ``"as-is"``) the module mode of the passes.
    ``return_convergence_delta`` records, per image, |Σ_i FAIG_i − (L(θ̄) − L(θ))| / |L(θ̄) − L(θ)|
    (Eq. 4).  ``check_completeness`` computes it on a sample of images (≤ 5 % extra cost;
    ``meta["completeness"]``) and warns with :class:`~faig_fast.errors.CompletenessWarning` when it
    exceeds what the quadrature rule explains.

    ``resume_dir`` persists every finished batch there and reuses those of an interrupted run with the
    same run key (settings, models, dataset fingerprint) and the same inputs: the sums are bit-identical
    to an uninterrupted run's; a folder of another run is refused.  ``distributed`` splits the batches
    over an initialised ``torch.distributed`` process group (torchrun) and returns the full result on
    every rank.
    """
    att = Attributor(model_a, model_b, steps=steps, method=method, device=device, strategy=strategy,
                     precision=precision, internal_batch_size=internal_batch_size, memory_budget=memory_budget,
                     backend=backend, return_convergence_delta=return_convergence_delta, filters=filters,
                     mode=mode, check_completeness=check_completeness)
    return run(att, loader, keep_per_image=keep_per_image, progress=progress, resume_dir=resume_dir,
               distributed=distributed)
