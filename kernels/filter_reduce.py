"""Triton kernels for the FAIG per-filter reduction.

``out[b, f] = scale * sum_j |delta[f*kk + j] * grads[b, f*kk + j]|``, optionally fused with
``sums[label[b], f] += out[b, f]``.  One program owns ``BLOCK_F`` filters and loops over the batch, so
``delta`` is read once and every ``grads`` element exactly once.  The kk elements of a filter sit in a
``KK_PAD = next_pow2(kk)`` wide tile with a mask.  Under ``TRITON_INTERPRET=1`` (CPU tensors) the
kernels run through Triton's interpreter with one fixed configuration; on GPU a small autotune picks
``BLOCK_F`` and ``num_warps``.  Input validation lives in :mod:`faig_fast.ops.reduction`.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from faig_fast.kernels._interpret import interpreted

__all__ = ["filter_abs_sum", "filter_abs_sum_accumulate", "interpreting"]

_INTERPRET_CONFIG = {"BLOCK_F": 64}


def interpreting(device: torch.device) -> bool:
    """Whether launches on ``device`` go through the Triton interpreter."""
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _filter_abs_sum_kernel(delta_ptr, grads_ptr, out_ptr, labels_ptr, sums_ptr,
                           B, F, stride_gb, scale_hi, scale_lo,
                           KK: tl.constexpr, KK_PAD: tl.constexpr, BLOCK_F: tl.constexpr,
                           ACCUMULATE: tl.constexpr, ATOMIC: tl.constexpr, ACC_FP64: tl.constexpr):
    pid = tl.program_id(0)
    offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_k = tl.arange(0, KK_PAD)
    mask_f = offs_f < F
    mask = mask_f[:, None] & (offs_k[None, :] < KK)
    elem = offs_f.to(tl.int64)[:, None] * KK + offs_k[None, :]

    d = tl.load(delta_ptr + elem, mask=mask, other=0.0)
    if ACC_FP64:
        d = d.to(tl.float64)
    else:
        d = d.to(tl.float32)

    g_ptrs = grads_ptr + elem
    out_ptrs = out_ptr + offs_f
    for b in range(0, B):
        g = tl.load(g_ptrs, mask=mask, other=0.0)
        if ACC_FP64:
            g = g.to(tl.float64)
        else:
            g = g.to(tl.float32)
        total = tl.sum(tl.abs(d * g), axis=1)
        if ACC_FP64:
            score = total * scale_hi + total * scale_lo
        else:
            score = total * scale_hi
        score = score.to(out_ptr.dtype.element_ty)
        tl.store(out_ptrs, score, mask=mask_f)
        if ACCUMULATE:
            label = tl.load(labels_ptr + b)
            s_ptrs = sums_ptr + label * F + offs_f
            if ATOMIC:
                tl.atomic_add(s_ptrs, score, mask=mask_f, sem="relaxed")
            else:  # no bf16 atomics everywhere; this program alone owns these filters, so RMW is safe
                old = tl.load(s_ptrs, mask=mask_f, other=0.0)
                tl.store(s_ptrs, (old.to(tl.float32) + score.to(tl.float32)).to(old.dtype), mask=mask_f)
        g_ptrs += stride_gb
        out_ptrs += F


_GPU_CONFIGS = [
    triton.Config({"BLOCK_F": bf}, num_warps=nw)
    for bf, nw in ((32, 2), (64, 4), (128, 4), (256, 8))
]

# restore_value: the autotuner's trial launches must not leave their atomic adds in ``sums``.
_filter_abs_sum_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["F", "KK_PAD", "ACCUMULATE"],
                                        restore_value=["sums_ptr"])(_filter_abs_sum_kernel)

def _interpreted_kernel():
    return interpreted(_filter_abs_sum_kernel)


def _split_scale(scale: float) -> tuple[float, float]:
    """``scale`` as fp32 hi + lo parts, so fp64 accumulation keeps ~48 bits of the scale."""
    hi = float(torch.tensor(scale, dtype=torch.float32))
    return hi, float(scale - hi)


def _launch(delta: torch.Tensor, grads: torch.Tensor, kk: int, scale: float,
            labels: torch.Tensor | None, sums: torch.Tensor | None) -> torch.Tensor:
    B, P = grads.shape
    F = P // kk
    out = torch.empty((B, F), dtype=grads.dtype, device=grads.device)
    if B == 0 or F == 0:
        return out
    delta = delta.contiguous()
    if grads.stride(1) != 1:
        grads = grads.contiguous()
    accumulate = labels is not None
    if not accumulate:
        labels, sums = out, out  # unused placeholders, never dereferenced
    hi, lo = _split_scale(scale)
    args = (delta, grads, out, labels, sums, B, F, grads.stride(0), hi, lo)
    meta = dict(KK=kk, KK_PAD=triton.next_power_of_2(kk), ACCUMULATE=accumulate,
                ATOMIC=grads.dtype != torch.bfloat16,
                ACC_FP64=grads.dtype == torch.float64)
    if interpreting(grads.device):
        grid = (triton.cdiv(F, _INTERPRET_CONFIG["BLOCK_F"]),)
        _interpreted_kernel()[grid](*args, **meta, **_INTERPRET_CONFIG)
    else:
        with torch.cuda.device(grads.device):
            _filter_abs_sum_tuned[lambda m: (triton.cdiv(F, m["BLOCK_F"]),)](*args, **meta)
    return out


def filter_abs_sum(delta: torch.Tensor, grads: torch.Tensor, kk: int, scale: float = 1.0) -> torch.Tensor:
    """Per-image per-filter ``scale * sum |delta * grads|``: delta (P,), grads (B, P) -> (B, P // kk)."""
    return _launch(delta, grads, kk, scale, None, None)


def filter_abs_sum_accumulate(delta: torch.Tensor, grads: torch.Tensor, kk: int, label_idx: torch.Tensor,
                              sums: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """:func:`filter_abs_sum` fused with ``sums[label_idx[b]] += out[b]`` (one launch); returns ``out``.

    ``sums`` must be contiguous with the dtype of ``grads``; ``label_idx`` int64 in ``[0, D)``.
    """
    return _launch(delta, grads, kk, scale, label_idx.contiguous(), sums)
