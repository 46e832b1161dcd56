"""The one home of the Triton-interpreter helpers (``TRITON_INTERPRET=1``).

Importing this module does not import triton, so the dispatch code in :mod:`faig_fast.ops` can ask
"would Triton run through its interpreter here?" without paying for (or failing on) a triton import.
"""
from __future__ import annotations

import os

import torch

__all__ = ["interpret_enabled", "interpreting", "interpreted"]

_cache: dict[int, object] = {}


def interpret_enabled() -> bool:
    """Whether ``TRITON_INTERPRET=1`` asks Triton to run kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def interpreting(device: torch.device) -> bool:
    """Whether launches on ``device`` go through the interpreter (always for CPU tensors)."""
    return device.type == "cpu" or interpret_enabled()


def interpreted(kernel):
    """``kernel`` as an interpreted function, even when ``triton.jit`` ran before TRITON_INTERPRET was set."""
    k = _cache.get(id(kernel))
    if k is None:
        from triton.runtime.interpreter import InterpretedFunction

        k = kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
        _cache[id(kernel)] = k
    return k
