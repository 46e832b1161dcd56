"""The linear-path engine's conv epilogue ``act(a + alpha * b + bias)``, with backend dispatch.

``a = conv(h, theta)`` and ``b = conv(h, Delta)`` (no bias); the fused Triton kernel
(:mod:`faig_fast.kernels.linear_path`) runs on CUDA tensors, PyTorch everywhere else and whenever
autograd needs to see the graph.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from faig_fast.errors import FAIGError, InvalidInputError
from faig_fast.kernels._interpret import interpret_enabled

__all__ = ["linear_path_combine", "linear_path_combine_torch"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def linear_path_combine_torch(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor],
                              negative_slope: Optional[float]) -> torch.Tensor:
    """Reference: ``act(a + alpha[:, None, ...] * b + bias[None, :, None, ...])`` (differentiable)."""
    shape = (-1,) + (1,) * (a.dim() - 1)
    y = torch.addcmul(a, alpha.to(a.dtype).view(shape), b)
    if bias is not None:
        bshape = (1 if bias.dim() == 1 else -1, bias.shape[-1]) + (1,) * (a.dim() - 2)
        y = y + bias.to(a.dtype).view(bshape)
    if negative_slope is not None:
        y = F.leaky_relu(y, float(negative_slope))
    return y


def _validate(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor],
              negative_slope: Optional[float]) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (a, b, alpha)):
        raise InvalidInputError("a, b and alpha must be tensors")
    if a.dim() < 2 or a.shape != b.shape:
        raise InvalidInputError(f"a and b must have one shape (N, C, ...), got {tuple(a.shape)} and "
                                f"{tuple(b.shape)}")
    if a.dtype not in _FLOAT_DTYPES or a.dtype != b.dtype:
        raise InvalidInputError(f"a and b must share a floating dtype, got {a.dtype} and {b.dtype}")
    n, c = a.shape[0], a.shape[1]
    if alpha.shape != (n,):
        raise InvalidInputError(f"alpha must have shape ({n},), got {tuple(alpha.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape not in ((c,), (n, c))):
        raise InvalidInputError(f"bias must be None or have shape ({c},) or ({n}, {c}), got "
                                f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias)}")
    for name, t in (("b", b), ("alpha", alpha), ("bias", bias)):
        if t is not None and t.device != a.device:
            raise InvalidInputError(f"{name} is on {t.device} but a on {a.device}")
    if alpha.dtype not in _FLOAT_DTYPES or (bias is not None and bias.dtype not in _FLOAT_DTYPES):
        raise InvalidInputError("alpha and bias must be floating point")
    if negative_slope is not None and (isinstance(negative_slope, bool)
                                       or not isinstance(negative_slope, (int, float))):
        raise InvalidInputError(f"negative_slope must be None or a number, got {negative_slope!r}")


def linear_path_combine(a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor, bias: Optional[torch.Tensor],
                        negative_slope: Optional[float] = None, *, backend: str = "auto") -> torch.Tensor:
    """``act(a + alpha[:, None, None, None] * b + bias[None, :, None, None])`` with act = LeakyReLU(slope) or id.

    ``auto`` uses the fused Triton kernel for CUDA tensors when no gradient is needed, else PyTorch;
    ``triton`` on CPU tensors needs TRITON_INTERPRET=1.
    """
    _validate(a, b, alpha, bias, negative_slope)
    if backend not in ("auto", "torch", "triton"):
        raise InvalidInputError(f"unknown backend {backend!r} for linear_path_combine; use auto, torch or triton")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (a, b, alpha, bias))
    use_triton = False
    if backend == "triton":
        if needs_grad:
            raise FAIGError("backend 'triton' is forward-only; inputs require grad (use torch.no_grad())")
        if a.device.type == "cpu" and not interpret_enabled():
            raise FAIGError("backend 'triton' runs on CPU tensors only with TRITON_INTERPRET=1")
        if a.device.type not in ("cpu", "cuda"):
            raise FAIGError(f"backend 'triton' does not support {a.device.type} tensors")
        use_triton = True
    elif backend == "auto" and a.device.type == "cuda" and not needs_grad:
        from faig_fast.ops.reduction import _triton_import

        use_triton = _triton_import()[0]
    if not use_triton:
        return linear_path_combine_torch(a, b, alpha, bias, negative_slope)
    try:
        from faig_fast.kernels.linear_path import linear_path_combine as triton_combine
    except Exception as exc:  # noqa: BLE001
        raise FAIGError(f"backend 'triton' is unavailable: {type(exc).__name__}: {exc}") from exc
    return triton_combine(a, b, alpha, bias, None if negative_slope is None else float(negative_slope))
