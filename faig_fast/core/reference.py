"""The reference FAIG: the paper's straightforward loop, kept as the oracle and benchmark baseline.

For each image and each step α_k it loads θ + α_k(θ̄ − θ) into a network, runs forward, takes
L = Σ (F − x_gt)², runs backward and accumulates ∂L/∂θ; then FAIG_i = (θ̄ − θ)_i Σ_k w_k g_i
(Eq. 6, with w_k = 1/N for the paper's left Riemann sum).  No batching, no shortcuts.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

from faig_fast.core.attribution import Attribution
from faig_fast.core.batches import iterate_batches, model_scale
from faig_fast.core.filters import FilterIndex
from faig_fast.core.pair import check_pair
from faig_fast.core.quadrature import nodes_and_weights


def sse(output: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """L(θ, x) = ‖F(θ, x) − x_gt‖² (Eq. 3), summed over pixels and channels."""
    return ((output - gt) ** 2).sum()


def reference_image_faig(model_a: nn.Module, model_b: nn.Module, lq: torch.Tensor, gt: torch.Tensor,
                         steps: int = 100, method: str = "riemann_left") -> dict[str, torch.Tensor]:
    """Signed FAIG_i of every parameter for one image (Eq. 6), keyed by parameter name."""
    lq = lq.unsqueeze(0) if lq.dim() == 3 else lq
    gt = gt.unsqueeze(0) if gt.dim() == 3 else gt
    baseline = {k: v.detach().clone() for k, v in model_a.state_dict().items()}
    target = {k: v.detach().clone() for k, v in model_b.state_dict().items()}
    net = copy.deepcopy(model_b).eval()
    alphas, weights = nodes_and_weights(method, steps)
    names = [n for n, _ in net.named_parameters()]
    total = {n: torch.zeros_like(target[n]) for n in names}
    for alpha, w in zip(alphas.tolist(), weights.tolist()):
        net.load_state_dict({k: alpha * baseline[k] + (1 - alpha) * target[k] if baseline[k].is_floating_point()
                             else target[k] for k in target})
        net.zero_grad(set_to_none=True)
        sse(net(lq), gt).backward()
        for n, p in net.named_parameters():
            total[n] += w * p.grad
    return {n: (baseline[n] - target[n]) * total[n] for n in names}


def filter_scores(faig: dict[str, torch.Tensor], index: FilterIndex) -> torch.Tensor:
    """Per-filter Σ over K×K of |FAIG_i| in flat-index order (conv weights only)."""
    return torch.cat([faig[l.name].abs().reshape(l.num_filters, -1).sum(1) for l in index.layers])


def reference_attribute(model_a: nn.Module, model_b: nn.Module, loader: Iterable, steps: int = 100,
                        method: str = "riemann_left", keep_per_image: bool = False) -> Attribution:
    """FAIG over a dataset with the naive loop; same result type as :func:`faig_fast.attribute`."""
    check_pair(model_a, model_b)
    index = FilterIndex.from_model(model_b)
    result = Attribution(index, {"steps": steps, "method": method, "engine": "reference"}, keep_per_image)
    for batch in iterate_batches(loader, model_scale(model_b)):
        for i in range(len(batch)):
            faig = reference_image_faig(model_a, model_b, batch.lq[i], batch.gt[i], steps, method)
            result.add(batch.labels[i], filter_scores(faig, index), batch.names[i])
    return result
