"""Triton epilogue for the linear-path engine.

Along the straight path theta(alpha) = theta + alpha * Delta a convolution splits into
``a = conv(h, theta)`` and ``b = conv(h, Delta)``; this kernel forms
``y = act(a + alpha[n] * b + bias)`` in one pass instead of three or four elementwise launches.
``a`` and ``b`` may be batch-strided views (e.g. the two halves of one conv with stacked weights) as
long as each sample's (C, *spatial) block is contiguous.  Forward only: no autograd.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from faig_fast.kernels._interpret import interpreted

__all__ = ["linear_path_combine", "interpreting"]

_INTERPRET_BLOCK = 1024


def interpreting(device: torch.device) -> bool:
    """Whether launches on ``device`` go through the Triton interpreter."""
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"


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


_linear_path_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK": bs}, num_warps=nw) for bs, nw in ((512, 4), (1024, 4), (2048, 8))],
    key=["C", "HW", "HAS_BIAS", "ACTIVATION"],
)(_linear_path_kernel)

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
