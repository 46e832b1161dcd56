"""Per-filter FAIG reductions with backend dispatch (torch, cpp, cuda, triton).

For one model, all conv weights of kernel area ``kk`` are flattened into one buffer of P elements, so
filter f covers ``[f*kk, (f+1)*kk)``.  With ``delta = baseline - target`` (P,) and the quadrature-
weighted path gradients ``grads`` (B, P) of B images, the FAIG score of filter f for image b is
``scale * sum_j |delta[f*kk+j] * grads[b, f*kk+j]|``.  Scores are then summed per degradation label.

Backends: ``torch`` (reference, always there), ``cpp`` (OpenMP extension, CPU tensors), ``cuda``
(the extension's CUDA kernels), ``triton`` (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
``auto`` picks triton > cuda > torch on GPU and cpp > torch on CPU, using the extension only when it
is already built (``faig info --build``): ``auto`` never waits for a compiler.
"""
from __future__ import annotations

import operator
import warnings
from typing import Optional, Union

import torch

from faig_fast.kernels._interpret import interpret_enabled
from faig_fast.ops import extension as _ext
from faig_fast.errors import FAIGError, InvalidInputError

__all__ = ["BACKENDS", "filter_abs_sum", "accumulate_by_label", "filter_abs_sum_accumulate",
           "filter_abs_sum_torch", "filter_abs_sum_accumulate_torch", "available_backends", "resolve_backend",
           "extension_status"]

BACKENDS = ("torch", "cpp", "cuda", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

extension_status = _ext.extension_status

_triton_state: dict[str, object] = {}
_broken: dict[str, str] = {}  # backends that failed at run time under "auto", with the reason


# --------------------------------------------------------------------------- reference (torch)

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def filter_abs_sum_torch(delta: torch.Tensor, grads: torch.Tensor, kk: int, scale: float = 1.0) -> torch.Tensor:
    """Reference implementation (no validation): (B, P // kk) in the dtype of ``grads``."""
    acc = _acc_dtype(grads.dtype)
    B, P = grads.shape
    prod = (grads.to(acc) * delta.to(acc)).abs_()
    return (prod.view(B, P // kk, kk).sum(-1) * scale).to(grads.dtype)


def filter_abs_sum_accumulate_torch(delta: torch.Tensor, grads: torch.Tensor, kk: int, label_idx: torch.Tensor,
                                    sums: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Reference fused op (no validation): scores, with ``sums.index_add_(0, label_idx, scores)``."""
    scores = filter_abs_sum_torch(delta, grads, kk, scale)
    sums.index_add_(0, label_idx, scores.to(sums.dtype))
    return scores


# --------------------------------------------------------------------------- backends

def _triton_import() -> tuple[bool, str]:
    """Whether ``faig_fast.kernels`` (and so triton) imports; cached."""
    if "ok" not in _triton_state:
        try:
            import faig_fast.kernels.filter_reduce  # noqa: F401
            import faig_fast.kernels.linear_path  # noqa: F401
            _triton_state.update(ok=True, why="")
        except Exception as exc:  # noqa: BLE001 - ImportError, or a triton that fails to initialise
            _triton_state.update(ok=False, why=f"triton unavailable ({type(exc).__name__}: {exc})")
    return bool(_triton_state["ok"]), str(_triton_state["why"])


def _triton_usable(device: torch.device) -> tuple[bool, str]:
    ok, why = _triton_import()
    if not ok:
        return False, why
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu":
        if interpret_enabled():
            return True, ""
        return False, "triton runs on CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
    return False, f"triton does not support {device.type} tensors here"


def _as_device(device: Union[torch.device, str, torch.Tensor]) -> torch.device:
    if isinstance(device, torch.Tensor):
        return device.device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(f"not a device: {device!r}") from exc


def resolve_backend(device: Union[torch.device, str, torch.Tensor], requested: str = "auto") -> str:
    """The backend that will run on tensors of ``device``.

    ``auto`` never fails and never compiles: triton, then the CUDA extension, then torch on GPU; the C++
    extension, then torch on CPU, where the extension counts only if a build is already on disk.  An
    explicit ``cpp``/``cuda`` builds the extension on first use; one that cannot run here raises
    :class:`FAIGError` saying why.
    """
    dev = _as_device(device)
    if not isinstance(requested, str) or requested not in ("auto",) + BACKENDS:
        raise InvalidInputError(f"unknown backend {requested!r}; choose one of {('auto',) + BACKENDS}")
    if requested == "auto":
        if dev.type == "cuda":
            if "triton" not in _broken and _triton_usable(dev)[0]:
                return "triton"
            if "cuda" not in _broken and _ext.load_extension(build=False) is not None and _ext.has_cuda_kernels():
                return "cuda"
            return "torch"
        if dev.type == "cpu" and "cpp" not in _broken and _ext.load_extension(build=False) is not None:
            return "cpp"
        return "torch"
    if requested == "torch":
        return "torch"
    if requested == "triton":
        ok, why = _triton_usable(dev)
        if not ok:
            raise FAIGError(f"backend 'triton' is unavailable: {why}")
        return "triton"
    if requested == "cpp":
        if dev.type != "cpu":
            raise FAIGError(f"backend 'cpp' runs on CPU tensors only, got {dev}; use 'cuda' or 'triton'")
    elif dev.type != "cuda":
        raise FAIGError(f"backend 'cuda' needs CUDA tensors, got {dev}")
    mod = _ext.load_extension(warn=False)
    if mod is None:
        raise FAIGError(f"backend {requested!r} is unavailable: C++ extension {_ext.extension_status()}")
    if requested == "cuda" and not mod.has_cuda():
        why = _ext._cuda_toolkit()[1] or "the CUDA build failed"
        raise FAIGError(f"backend 'cuda' is unavailable: the extension was built without CUDA ({why})")
    return requested


def available_backends(build: bool = False) -> list[str]:
    """Backends usable in this process; ``build=True`` first builds the C++ extension if it is not built."""
    out = ["torch"]
    mod = _ext.load_extension(warn=False, build=build)
    if mod is not None:
        out.append("cpp")
        if mod.has_cuda() and torch.cuda.is_available():
            out.append("cuda")
    if _triton_import()[0] and (torch.cuda.is_available() or interpret_enabled()):
        out.append("triton")
    return out


# --------------------------------------------------------------------------- validation

def _check_kk(kk: object) -> int:
    if isinstance(kk, bool):
        raise InvalidInputError(f"kk must be a positive int, got {kk!r}")
    try:
        k = operator.index(kk)
    except TypeError:
        raise InvalidInputError(f"kk must be a positive int, got {kk!r}") from None
    if k < 1:
        raise InvalidInputError(f"kk must be >= 1, got {k}")
    return k


def _check_scale(scale: object) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) and not (
            isinstance(scale, torch.Tensor) and scale.numel() == 1):
        raise InvalidInputError(f"scale must be a real number, got {scale!r}")
    return float(scale)


def _check_pair(delta: object, grads: object, kk: object) -> int:
    if not isinstance(delta, torch.Tensor) or not isinstance(grads, torch.Tensor):
        raise InvalidInputError(f"delta and grads must be tensors, got {type(delta).__name__} and "
                                f"{type(grads).__name__}")
    k = _check_kk(kk)
    if delta.dim() != 1:
        raise InvalidInputError(f"delta must be 1-D (P,), got shape {tuple(delta.shape)}")
    if grads.dim() != 2:
        raise InvalidInputError(f"grads must be 2-D (B, P), got shape {tuple(grads.shape)}")
    if grads.shape[1] != delta.shape[0]:
        raise InvalidInputError(f"grads has {grads.shape[1]} columns but delta has {delta.shape[0]} elements")
    if delta.shape[0] % k:
        raise InvalidInputError(f"P={delta.shape[0]} is not a multiple of kk={k}")
    if delta.device != grads.device:
        raise InvalidInputError(f"delta is on {delta.device} but grads on {grads.device}")
    if grads.dtype not in _FLOAT_DTYPES:
        raise InvalidInputError(f"grads must be floating point ({_FLOAT_DTYPES}), got {grads.dtype}")
    if delta.dtype != grads.dtype:
        raise InvalidInputError(f"delta ({delta.dtype}) and grads ({grads.dtype}) must share a dtype")
    return k


def _check_labels(label_idx: object, sums: object, n_images: int, n_filters: int, grads: torch.Tensor) -> None:
    if not isinstance(label_idx, torch.Tensor) or not isinstance(sums, torch.Tensor):
        raise InvalidInputError("label_idx and sums must be tensors")
    if label_idx.dtype != torch.int64:
        raise InvalidInputError(f"label_idx must be int64, got {label_idx.dtype}")
    if label_idx.dim() != 1 or label_idx.shape[0] != n_images:
        raise InvalidInputError(f"label_idx must have shape ({n_images},), got {tuple(label_idx.shape)}")
    if sums.dim() != 2 or sums.shape[1] != n_filters:
        raise InvalidInputError(f"sums must have shape (D, {n_filters}), got {tuple(sums.shape)}")
    if sums.dtype != grads.dtype:
        raise InvalidInputError(f"sums ({sums.dtype}) must have the dtype of the scores ({grads.dtype})")
    if label_idx.device != grads.device or sums.device != grads.device:
        raise InvalidInputError(f"label_idx ({label_idx.device}) and sums ({sums.device}) must be on "
                                f"{grads.device}")
    if n_images and bool(((label_idx < 0) | (label_idx >= sums.shape[0])).any()):
        raise InvalidInputError(f"label_idx values must lie in [0, {sums.shape[0]}), got "
                                f"{label_idx.min().item()}..{label_idx.max().item()}")


# --------------------------------------------------------------------------- dispatch

def _run(backend: str, requested: str, delta: torch.Tensor, grads: torch.Tensor, kk: int, scale: float,
         label_idx: Optional[torch.Tensor], sums: Optional[torch.Tensor]) -> torch.Tensor:
    fused = label_idx is not None
    try:
        if backend == "torch":
            if fused:
                return filter_abs_sum_accumulate_torch(delta, grads, kk, label_idx, sums, scale)
            return filter_abs_sum_torch(delta, grads, kk, scale)
        delta = delta.contiguous()
        if grads.stride(1) != 1:
            grads = grads.contiguous()
        if fused and not sums.is_contiguous():  # kernels write in place; keep the caller's view intact
            scores = _run(backend, requested, delta, grads, kk, scale, None, None)
            sums.index_add_(0, label_idx, scores)
            return scores
        if backend == "triton":
            from faig_fast.kernels import filter_reduce as tk

            if fused:
                return tk.filter_abs_sum_accumulate(delta, grads, kk, label_idx, sums, scale)
            return tk.filter_abs_sum(delta, grads, kk, scale)
        mod = _ext.load_extension(warn=False)
        if fused:
            return mod.filter_abs_sum_accumulate(delta, grads, kk, label_idx.contiguous(), sums, scale)
        return mod.filter_abs_sum(delta, grads, kk, scale)
    except Exception as exc:
        if requested != "auto" or backend == "torch" or isinstance(exc, (FAIGError, torch.OutOfMemoryError)):
            raise
        # "auto" must keep working: remember the broken backend, say so once, and try the next one.
        _broken[backend] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"faig_fast backend {backend!r} failed ({_broken[backend][:300]}); falling back",
                      RuntimeWarning, stacklevel=3)
        return _run(resolve_backend(grads.device, "auto"), "auto", delta, grads, kk, scale, label_idx, sums)


def filter_abs_sum(delta: torch.Tensor, grads: torch.Tensor, kk: int, *, scale: float = 1.0,
                   backend: str = "auto") -> torch.Tensor:
    """Per-image per-filter FAIG scores ``out[b, f] = scale * sum_j |delta[f*kk+j] * grads[b, f*kk+j]|``.

    delta (P,), grads (B, P) on one device with one float dtype, P % kk == 0; returns (B, P // kk) in
    that dtype, accumulated in fp32 (fp64 for fp64 inputs).
    """
    k = _check_pair(delta, grads, kk)
    s = _check_scale(scale)
    be = resolve_backend(grads.device, backend)
    if grads.numel() == 0:
        return torch.zeros((grads.shape[0], delta.shape[0] // k), dtype=grads.dtype, device=grads.device)
    return _run(be, backend, delta, grads, k, s, None, None)


def accumulate_by_label(scores: torch.Tensor, label_idx: torch.Tensor, sums: torch.Tensor, *,
                        backend: str = "auto") -> None:
    """``sums[label_idx[b]] += scores[b]`` for every row b (repeated labels add up), in place.

    Every backend uses ``index_add_`` (already a single pass on CPU and GPU); ``backend`` is validated
    for symmetry with the other functions.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise InvalidInputError(f"scores must be a 2-D tensor (B, F), got "
                                f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)}")
    if scores.dtype not in _FLOAT_DTYPES:
        raise InvalidInputError(f"scores must be floating point, got {scores.dtype}")
    _check_labels(label_idx, sums, scores.shape[0], scores.shape[1], scores)
    resolve_backend(scores.device, backend)
    sums.index_add_(0, label_idx, scores)


def filter_abs_sum_accumulate(delta: torch.Tensor, grads: torch.Tensor, kk: int, label_idx: torch.Tensor,
                              sums: torch.Tensor, *, scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """:func:`filter_abs_sum` fused with :func:`accumulate_by_label`: one pass (one launch on triton/cuda).

    sums (D, P // kk) with the dtype of grads is updated in place; label_idx (B,) int64 in [0, D).
    Returns the per-image scores (B, P // kk).
    """
    k = _check_pair(delta, grads, kk)
    s = _check_scale(scale)
    _check_labels(label_idx, sums, grads.shape[0], delta.shape[0] // k, grads)
    be = resolve_backend(grads.device, backend)
    if grads.numel() == 0:
        return torch.zeros((grads.shape[0], delta.shape[0] // k), dtype=grads.dtype, device=grads.device)
    return _run(be, backend, delta, grads, k, s, label_idx, sums)
