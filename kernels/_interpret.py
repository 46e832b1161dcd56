"""Run a ``@triton.jit`` kernel through Triton's interpreter on CPU tensors (TRITON_INTERPRET=1)."""
from __future__ import annotations

_cache: dict[int, object] = {}


def interpreted(kernel):
    """``kernel`` as an interpreted function, even when ``triton.jit`` ran before TRITON_INTERPRET was set."""
    k = _cache.get(id(kernel))
    if k is None:
        from triton.runtime.interpreter import InterpretedFunction

        k = kernel if isinstance(kernel, InterpretedFunction) else InterpretedFunction(kernel.fn)
        _cache[id(kernel)] = k
    return k
