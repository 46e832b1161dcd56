"""The ``persample`` strategy: node-major passes with per-sample weight gradients (``torch.func``).

At each node α_k every image of a same-size batch goes through one pass with the shared weights
θ + α_kΔ; ``vmap`` over images of ``grad`` w.r.t. the shared parameters gives each image's own
gradient, and Σ_k w_k g_k and f_k = g_k·Δ are accumulated on the device.  That is the loop's FLOPs,
batched.  Node passes have static shapes, so on CUDA one node (pass + accumulation) is captured in a
CUDA graph and replayed per node with α_k and w_k written into static tensors (for rules of at
least :data:`MIN_NODES` nodes, or shapes already captured); if capture fails the passes run eagerly
(with a warning, once).
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch.func import grad, vmap

from faig_fast.core.strategies.base import ImageResult, Strategy, split_images

MAX_GRAPHS = 4  # captured graphs kept (one per batch shape), least recently used dropped
MIN_NODES = 16  # a new shape costs a warm-up pass and a capture: worth it from this many nodes on


class PerSample(Strategy):
    """Chunks of images (planned and halved on out-of-memory by the runner), node-major inside."""

    name = "persample"
    transforms = True

    def __init__(self, engine: Any):
        super().__init__(engine)
        self.use_graphs = engine.device.type == "cuda"
        self.graphs: OrderedDict = OrderedDict()

    def integrate(self, lq: torch.Tensor, gt: torch.Tensor, alphas: torch.Tensor,
                  weights: torch.Tensor) -> list[ImageResult]:
        runner, parts = self.engine.runner, []
        n = lq.shape[0]
        size = runner.plan_chunk(n, self.engine.step_bytes(lq[:1]), 2)
        runner.run_chunks(n, size, lambda s, e: parts.append(self.chunk(lq[s:e], gt[s:e], alphas, weights)))
        return [img for g, f in parts for img in split_images(g, f)]

    def chunk(self, lq: torch.Tensor, gt: torch.Tensor, alphas: torch.Tensor,
              weights: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """({name: (b, ...)} ḡ, slopes (b, N)) for a chunk of b images."""
        key = (tuple(lq.shape), tuple(gt.shape))
        if self.use_graphs and (len(alphas) >= MIN_NODES or key in self.graphs):
            try:
                return self._graphed(lq, gt, alphas, weights)
            except torch.OutOfMemoryError:
                self.graphs.clear()
                raise
            except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager passes
                self.use_graphs = False
                self.graphs.clear()
                warnings.warn(f"persample: CUDA graph capture failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}); running node passes eagerly", RuntimeWarning)
        return self._eager(lq, gt, alphas, weights)

    def _grad_fn(self) -> Callable:
        # outside eval mode a forward may write into its buffers (BatchNorm running statistics): each
        # image then gets its own copy, as it would in its own pass
        per_image = self.engine.mode != "eval"
        return vmap(grad(self.engine.image_loss), in_dims=(None, 0 if per_image else None, 0, 0))

    def _buffers(self, alpha: float | torch.Tensor, batch: int) -> dict:
        b = self.engine.space.buffers_at(alpha)
        if self.engine.mode == "eval":
            return b
        return {n: t.expand(batch, *t.shape).clone() for n, t in b.items()}

    def _zeros(self, batch: int) -> dict:
        return {n: t.new_zeros((batch, *t.shape)) for n, t in self.engine.theta.items()}

    def _eager(self, lq: torch.Tensor, gt: torch.Tensor, alphas: torch.Tensor,
               weights: torch.Tensor) -> tuple[dict, torch.Tensor]:
        space, fn = self.engine.space, self._grad_fn()
        total = self._zeros(lq.shape[0])
        slopes = []
        for a, w in zip(alphas.tolist(), weights.tolist()):
            g = fn(space.params_at(a), self._buffers(a, lq.shape[0]), lq, gt)
            for n, t in total.items():
                t.add_(g[n], alpha=w)
            slopes.append(space.slope(g))
        return total, torch.stack(slopes, 1)

    def _graphed(self, lq: torch.Tensor, gt: torch.Tensor, alphas: torch.Tensor,
                 weights: torch.Tensor) -> tuple[dict, torch.Tensor]:
        key = (tuple(lq.shape), tuple(gt.shape))
        entry = self.graphs.pop(key, None) or self._capture(lq, gt)
        self.graphs[key] = entry
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        graph, static, total = entry
        static["lq"].copy_(lq)
        static["gt"].copy_(gt)
        for t in total.values():
            t.zero_()
        a_dev = alphas.to(lq.device, lq.dtype)
        w_dev = weights.to(lq.device, lq.dtype)
        slopes = torch.empty((lq.shape[0], len(a_dev)), dtype=torch.float64, device=lq.device)
        for k in range(len(a_dev)):
            static["alpha"].copy_(a_dev[k])
            static["w"].copy_(w_dev[k])
            graph.replay()
            slopes[:, k].copy_(static["slope"])
        return {n: t.clone() for n, t in total.items()}, slopes

    def _capture(self, lq: torch.Tensor, gt: torch.Tensor) -> tuple:
        """Capture one node (pass, weighted accumulation, slope) into static tensors as a CUDA graph."""
        space, fn, batch = self.engine.space, self._grad_fn(), lq.shape[0]
        static = {"lq": lq.clone(), "gt": gt.clone(), "alpha": lq.new_zeros(()), "w": lq.new_zeros(()),
                  "slope": lq.new_zeros((batch,), dtype=torch.float64)}
        total = self._zeros(batch)

        def node() -> None:
            g = fn(space.params_at(static["alpha"]), self._buffers(static["alpha"], batch), static["lq"], static["gt"])
            for n, t in total.items():
                t.add_(g[n] * static["w"])
            static["slope"].copy_(space.slope(g))

        side = torch.cuda.Stream(lq.device)
        side.wait_stream(torch.cuda.current_stream(lq.device))
        with torch.cuda.stream(side):
            node()  # warm-up outside the capture; w = 0 adds nothing
        torch.cuda.current_stream(lq.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            node()
        return graph, static, total
