"""The engine's strategies behind one interface (:class:`~faig_fast.core.strategies.base.Strategy`):
``loop``, ``persample``, ``vmap`` and ``linear``, registered by name in :data:`REGISTRY`.  A new one
subclasses ``Strategy`` and registers here; the engine's tuning, fallback, chunking and
out-of-memory policy apply to it unchanged."""
from __future__ import annotations

from faig_fast.core.strategies.base import ImageResult, Strategy
from faig_fast.core.strategies.linear import Linear, linear_path_blocker, linear_path_conv
from faig_fast.core.strategies.loop import Loop
from faig_fast.core.strategies.persample import PerSample
from faig_fast.core.strategies.vmap import VMap

#: Every strategy by name; the order is the order ``tune`` times them in.
REGISTRY: dict[str, type[Strategy]] = {s.name: s for s in (Linear, PerSample, VMap, Loop)}

__all__ = ["REGISTRY", "ImageResult", "Strategy", "Linear", "Loop", "PerSample", "VMap", "linear_path_blocker",
           "linear_path_conv"]
