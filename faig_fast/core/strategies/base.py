"""What every strategy shares: its interface, the per-image result, and the step-chunk loop that
runs under the runner's one chunking and out-of-memory policy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class ImageResult:
    """Path-integrated gradient of one image and the slope of the loss along the path at each node.

    ``grads``: ḡ = Σ_k w_k ∂L/∂γ(α_k), one tensor per path parameter.  ``slopes``: (N,) float64 on
    the device, f_k = Σ over path parameters of ∂L/∂γ(α_k)·Δ (the parameters' share of dL/dα at node
    k), in the order of the rule's nodes; Σ_k w_k f_k = Σ_i FAIG_i.
    """

    grads: dict[str, torch.Tensor]
    slopes: torch.Tensor


class Strategy:
    """One way to compute :class:`ImageResult` for a batch of same-size images on an engine.

    Subclasses set ``name`` and implement :meth:`integrate`; ``transforms`` marks strategies built on
    ``torch.func`` transforms, which some models cannot run (the engine then falls back to ``loop``).
    """

    name = ""
    transforms = False

    def __init__(self, engine: Any):  # a faig_fast.core.engine.PathEngine (it imports this package)
        self.engine = engine

    def blocker(self) -> str | None:
        """Why this strategy cannot run the engine's model correctly, or ``None`` when it can."""
        return None

    def integrate(self, lq: torch.Tensor, gt: torch.Tensor, alphas: torch.Tensor,
                  weights: torch.Tensor) -> list[ImageResult]:
        """Results for ``lq`` (B,C,h,w), ``gt`` (B,C',H,W) on the engine's device and dtype, at the
        rule's nodes ``alphas`` and weights ``weights`` (float64, host or device)."""
        raise NotImplementedError


def split_images(grads: dict[str, torch.Tensor], slopes: torch.Tensor) -> list[ImageResult]:
    """Batched ``grads`` {name: (B, ...)} and ``slopes`` (B, N) as one result per image."""
    return [ImageResult({n: g[i] for n, g in grads.items()}, slopes[i]) for i in range(slopes.shape[0])]


def over_steps(engine: Any, x: torch.Tensor, batch: int, alphas: torch.Tensor, weights: torch.Tensor,
               chunk: Callable[[torch.Tensor, torch.Tensor], tuple[dict, torch.Tensor]],
               factor: int = 2) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Σ over chunks of steps of ``chunk(alphas, weights) -> (grads, w·f)`` with the weighted slopes
    (..., steps of the chunk) placed at their nodes and divided by the weights: (grads, slopes (..., N)).

    ``x`` is one image of the batch (its size sets the memory per step), ``batch`` the images each
    step carries; chunks are planned and halved on out-of-memory by the engine's runner.
    """
    runner = engine.runner
    alphas = alphas.to(runner.device, runner.dtype)
    weights = weights.to(runner.device, runner.dtype)
    total: dict[str, torch.Tensor] = {}
    weighted: list[tuple[int, torch.Tensor]] = []

    def run(start: int, stop: int) -> None:
        g, ws = chunk(alphas[start:stop], weights[start:stop])
        for n, t in g.items():
            if n in total:
                total[n].add_(t)
            else:
                total[n] = t.clone()
        weighted.append((start, ws))

    size = runner.plan_chunk(len(alphas), engine.step_bytes(x) * batch, factor)
    runner.run_chunks(len(alphas), size, run)
    ws = torch.cat([w for _, w in sorted(weighted, key=lambda p: p[0])], dim=-1).double()
    return total, unweight(ws, weights)


def unweight(weighted_slopes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """f_k from w_k·f_k (autograd through a differentiable α gives the weighted slope); NaN where w_k = 0."""
    w = weights.to(weighted_slopes.device, torch.float64)
    return torch.where(w != 0, weighted_slopes / torch.where(w != 0, w, 1.0), torch.nan)
