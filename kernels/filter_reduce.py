"""Triton kernels for the FAIG per-filter reduction.

``out[b, f] = scale * sum_j |delta[f*kk + j] * grads[b, f*kk + j]|``, optionally fused with
``sums[label[b], f] += out[b, f]``.  One program owns ``BLOCK_F`` filters and loops over the batch, so
``delta`` is read once and every ``grads`` element exactly once.  The kk elements of a filter sit in a
``KK_PAD = next_pow2(kk)`` wide tile with a mask.  Under ``TRITON_INTERPRET=1`` (CPU tensors) the
kernels run through Triton's interpreter with one fixed configuration; on GPU a small autotune picks
``BLOCK_F`` and ``num_warps``.  Input validation lives in :mod:`faig_fast.ops.reduction`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from faig_fast.kernels._interpret import interpreted, interpreting

__all__ = ["filter_abs_sum", "filter_abs_sum_accumulate"]

_INTERPRET_CONFIG = {"BLOCK_F": 64}



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


# maxnreg=255 (the hardware limit, so no real cap) emits ``.maxnreg 255``: without it ptxas aims for an
# occupancy step and spilled a predicate register (8 bytes of local memory) on sm_80 at kk = 25, fp32
# BLOCK_F = 32/2 warps and 64/4 warps (96 registers), fp64 accumulate 128/8 warps (128 registers); with
# it they take 113 and 168 registers and spill nothing.  The autotuner launches these same Configs
# and faig_fast.ops.aot compiles them with their maxnreg, so what is checked ahead of time is what runs.
_MAXNREG = 255
_GPU_CONFIGS = [
    triton.Config({"BLOCK_F": bf}, num_warps=nw, maxnreg=_MAXNREG)
    for bf, nw in ((16, 4), (32, 2), (64, 4), (128, 8), (256, 8))
]
# Each thread holds BLOCK_F * KK_PAD / (32 * num_warps) elements of delta and of grads: above 32 the
# kernel spills registers (seen with `faig info --kernels sm_80,sm_90 --full`: kk = 49 at BLOCK_F = 256).
_MAX_ELEMS_PER_THREAD = 32


def configs_for(kk_pad: int, configs=None) -> list:
    """The autotune configs that keep at most 32 elements per thread at this padded kernel area."""
    configs = _GPU_CONFIGS if configs is None else configs
    kept = [c for c in configs if c.kwargs["BLOCK_F"] * kk_pad <= _MAX_ELEMS_PER_THREAD * 32 * c.num_warps]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_F"] / c.num_warps)]


def _prune(configs, named_args, **kwargs):
    return configs_for(kwargs.get("KK_PAD", named_args.get("KK_PAD")), configs)


# restore_value: the autotuner's trial launches must not leave their atomic adds in ``sums``.
_filter_abs_sum_tuned = triton.autotune(configs=_GPU_CONFIGS, key=["F", "KK_PAD", "ACCUMULATE"],
                                        prune_configs_by={"early_config_prune": _prune},
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


# --------------------------------------------------------------------------- ahead-of-time checks

_TRITON_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


def aot_variants(full: bool = False) -> list[tuple[str, dict, dict]]:
    """(label, signature, constexprs) of the specialisations :mod:`faig_fast.ops.aot` compiles.

    The quick set covers every code path of the kernel (fp32/fp64/bf16 accumulation, atomic and
    read-modify-write sums, kk = 1 and a padded kk); ``full`` adds fp16, more kernel areas and
    64-bit strides.  Each is compiled with every autotune config the autotuner keeps for it
    (:func:`aot_configs`).
    """
    if full:
        cases = [(dt, acc, kk, idx) for dt in _TRITON_TYPES for acc in (False, True) for kk in (1, 9, 25, 49, 81)
                 for idx in ("i32", "i64")]
    else:
        cases = [(torch.float32, True, 9, "i32"), (torch.float32, False, 9, "i32"), (torch.float32, True, 1, "i32"),
                 (torch.float32, True, 49, "i32"),
                 (torch.bfloat16, True, 9, "i32"), (torch.float64, True, 9, "i32")]
    out = []
    for dtype, acc, kk, idx in cases:
        t = _TRITON_TYPES[dtype]
        sig = {"delta_ptr": f"*{t}", "grads_ptr": f"*{t}", "out_ptr": f"*{t}", "labels_ptr": "*i64",
               "sums_ptr": f"*{t}", "B": "i32", "F": "i32", "stride_gb": idx, "scale_hi": "fp32",
               "scale_lo": "fp32"}
        const = dict(KK=kk, KK_PAD=triton.next_power_of_2(kk), ACCUMULATE=acc, ATOMIC=dtype != torch.bfloat16,
                     ACC_FP64=dtype == torch.float64)
        out.append((f"{t} kk={kk}{' acc' if acc else ''}{' i64' if idx == 'i64' else ''}", sig, const))
    return out


def aot_configs(constexprs: dict) -> list:
    """The autotune configs the autotuner would try for this specialisation."""
    return configs_for(constexprs["KK_PAD"])


AOT_KERNEL = _filter_abs_sum_kernel
AUTOTUNE_CONFIGS = _GPU_CONFIGS
