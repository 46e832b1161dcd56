"""Triton epilogue for the linear-path engine.

Along the straight path theta(alpha) = theta + alpha * Delta a convolution splits into
``a = conv(h, theta)`` and ``b = conv(h, Delta)``; this kernel forms
``y = act(a + alpha[n] * b + bias)`` in one pass instead of three or four elementwise launches.
``a`` and ``b`` may be batch-strided views (e.g. the two halves of one conv with stacked weights) as
long as each sample's (C, *spatial) block is contiguous.  Forward only: no autograd.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from faig_fast.kernels._interpret import interpreted, interpreting

__all__ = ["linear_path_combine"]

_INTERPRET_BLOCK = 1024



@triton.jit
def _linear_path_kernel(a_ptr, b_ptr, alpha_ptr, bias_ptr, out_ptr,
                        N, C, HW, total, stride_an, stride_bn, negative_slope,
                        HAS_BIAS: tl.constexpr, BIAS_PER_SAMPLE: tl.constexpr, ACTIVATION: tl.constexpr,
                        ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    chw = C * HW
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n = offs // chw
    r = offs - n * chw
    c = r // HW

    a = tl.load(a_ptr + n * stride_an + r, mask=mask, other=0.0)
    b = tl.load(b_ptr + n * stride_bn + r, mask=mask, other=0.0)
    alpha = tl.load(alpha_ptr + n, mask=mask, other=0.0)
    if ACC_FP64:
        y = a.to(tl.float64) + alpha.to(tl.float64) * b.to(tl.float64)
    else:
        y = a.to(tl.float32) + alpha.to(tl.float32) * b.to(tl.float32)
    if HAS_BIAS:
        if BIAS_PER_SAMPLE:
            bias = tl.load(bias_ptr + n * C + c, mask=mask, other=0.0)
        else:
            bias = tl.load(bias_ptr + c, mask=mask, other=0.0)
        y += bias.to(y.dtype)
    if ACTIVATION:
        y = tl.where(y >= 0, y, y * negative_slope)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


AUTOTUNE_CONFIGS = [triton.Config({"BLOCK": bs}, num_warps=nw) for bs, nw in ((512, 4), (1024, 4), (2048, 8))]
_linear_path_tuned = triton.autotune(configs=AUTOTUNE_CONFIGS,
                                     key=["C", "HW", "HAS_BIAS", "ACTIVATION"])(_linear_path_kernel)

def _interpreted_kernel():
    return interpreted(_linear_path_kernel)


def _sample_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when each sample's block is contiguous (any batch stride), else a contiguous copy."""
    return x if x[0].is_contiguous() else x.contiguous()


def linear_path_combine(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
                        negative_slope: float | None) -> torch.Tensor:
    """``act(a + alpha[:, None, None, None] * b + bias[None, :, None, None])`` in one launch.

    a, b: (N, C, *spatial) with equal shapes and dtypes; alpha: (N,); bias: (C,), (N, C) or None;
    ``negative_slope`` None means no activation, otherwise LeakyReLU with that slope (0 gives ReLU).
    Returns a new contiguous tensor of a's dtype.
    """
    N, C = a.shape[0], a.shape[1]
    HW = a[0, 0].numel() if N and C else 0
    out = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    a, b = _sample_contiguous(a), _sample_contiguous(b)
    alpha = alpha.contiguous()
    has_bias = bias is not None
    per_sample = has_bias and bias.dim() == 2
    bias_arg = bias.contiguous() if has_bias else alpha
    total = out.numel()
    args = (a, b, alpha, bias_arg, out, N, C, HW, total, a.stride(0), b.stride(0),
            0.0 if negative_slope is None else float(negative_slope))
    meta = dict(HAS_BIAS=has_bias, BIAS_PER_SAMPLE=per_sample, ACTIVATION=negative_slope is not None,
                ACC_FP64=a.dtype == torch.float64)
    if interpreting(a.device):
        _interpreted_kernel()[(triton.cdiv(total, _INTERPRET_BLOCK),)](*args, **meta, BLOCK=_INTERPRET_BLOCK)
    else:
        with torch.cuda.device(a.device):
            _linear_path_tuned[lambda m: (triton.cdiv(total, m["BLOCK"]),)](*args, **meta)
    return out


# --------------------------------------------------------------------------- ahead-of-time checks

_TRITON_TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


def aot_variants(full: bool = False) -> list[tuple[str, dict, dict]]:
    """(label, signature, constexprs) of the specialisations :mod:`faig_fast.ops.aot` compiles.

    The quick set covers fp32 with per-channel bias and LeakyReLU, per-sample bias, and fp64; ``full``
    adds bf16/fp16, no bias / no activation and 64-bit sizes.  Each is compiled with every autotune
    config (:data:`AUTOTUNE_CONFIGS`).
    """
    if full:
        cases = [(dt, bias, act, idx) for dt in _TRITON_TYPES for bias in ("none", "channel", "sample")
                 for act in (False, True) for idx in ("i32", "i64")]
    else:
        cases = [(torch.float32, "channel", True, "i32"), (torch.float32, "sample", False, "i32"),
                 (torch.float64, "channel", True, "i32")]
    out = []
    for dtype, bias, act, idx in cases:
        t = _TRITON_TYPES[dtype]
        sig = {"a_ptr": f"*{t}", "b_ptr": f"*{t}", "alpha_ptr": f"*{t}", "bias_ptr": f"*{t}", "out_ptr": f"*{t}",
               "N": "i32", "C": "i32", "HW": "i32", "total": idx, "stride_an": idx, "stride_bn": idx,
               "negative_slope": "fp32"}
        const = dict(HAS_BIAS=bias != "none", BIAS_PER_SAMPLE=bias == "sample", ACTIVATION=act,
                     ACC_FP64=dtype == torch.float64)
        out.append((f"{t} bias={bias}{' act' if act else ''}{' i64' if idx == 'i64' else ''}", sig, const))
    return out


AOT_KERNEL = _linear_path_kernel
