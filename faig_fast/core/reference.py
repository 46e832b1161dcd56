"""The reference FAIG: the paper's straightforward loop, kept as the oracle and benchmark baseline.

For each image and each step α_k it loads θ + α_k(θ̄ − θ) into a copy of model_b (every floating
parameter and floating buffer, persistent or not; integer buffers reset to model_b's), runs forward
on a fresh copy of the input, takes L = Σ (F − x_gt)², runs backward and accumulates ∂L/∂θ; then
FAIG_i = (θ̄ − θ)_i Σ_k w_k g_i (Eq. 6, with w_k = 1/N for the paper's left Riemann sum).  No
batching, no shortcuts.  Parameters the forward does not use get 0.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from faig_fast.core.attribution import Attribution
from faig_fast.core.batches import iterate_batches, model_scale
from faig_fast.core.filters import FilterIndex
from faig_fast.core.pair import check_pair
from faig_fast.core.path_params import check_mode, private_copy
from faig_fast.core.paths import floating_parameters
from faig_fast.core.quadrature import nodes_and_weights


def sse(output: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """L(θ, x) = ‖F(θ, x) − x_gt‖² (Eq. 3), summed over pixels and channels."""
    return ((output - gt) ** 2).sum()


def reference_image_faig(model_a: nn.Module, model_b: nn.Module, lq: torch.Tensor, gt: torch.Tensor,
                         steps: int = 100, method: str = "riemann_left",
                         mode: str = "eval") -> dict[str, torch.Tensor]:
    """Signed FAIG_i of every floating parameter for one image (Eq. 6), keyed by canonical name."""
    net = private_copy(model_b, mode)
    params = floating_parameters(net)
    tensors = {**params, **dict(net.named_buffers())}
    others = {**dict(model_a.named_parameters()), **dict(model_a.named_buffers())}
    target = {n: t.detach().clone() for n, t in tensors.items()}
    baseline = {n: others[n].detach().to(t) for n, t in target.items()}
    p0 = next(iter(params.values()))
    lq = (lq.unsqueeze(0) if lq.dim() == 3 else lq).to(p0)
    gt = (gt.unsqueeze(0) if gt.dim() == 3 else gt).to(p0)
    for p in params.values():
        p.requires_grad_(True)
    alphas, weights = nodes_and_weights(method, steps)
    total = {n: torch.zeros_like(target[n]) for n in params}
    for alpha, w in zip(alphas.tolist(), weights.tolist()):
        with torch.no_grad():
            for n, t in tensors.items():
                moving = t.is_floating_point()
                t.copy_(target[n] + alpha * (baseline[n] - target[n]) if moving else target[n])
        net.zero_grad(set_to_none=True)
        sse(net(lq.clone()), gt).backward()
        for n, p in params.items():
            if p.grad is not None:
                total[n] += w * p.grad
    return {n: (baseline[n] - target[n]) * total[n] for n in params}


def filter_scores(grads: dict[str, torch.Tensor], index: FilterIndex) -> torch.Tensor:
    """Per-filter Σ over a filter's weights of |·| in flat-index order (float64): the one place a
    dict of per-parameter values (FAIG, IG gradients, weight changes) becomes per-filter scores."""
    return torch.cat([grads[l.name].detach().abs().reshape(l.num_filters, -1).sum(1).double()
                      for l in index.layers])


def score_images(result: Attribution, loader: Iterable, scale: int | None,
                 score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 progress: Callable[[int, str, str], None] | None = None) -> Attribution:
    """The per-image loop shared by the naive baselines: ``score(lq, gt)`` (CHW) of every validated
    image, added to ``result`` under its label and name."""
    count = 0
    for batch in iterate_batches(loader, scale):
        for i in range(len(batch)):
            result.add(batch.labels[i], score(batch.lq[i], batch.gt[i]), batch.names[i])
            count += 1
            if progress is not None:
                progress(count, batch.names[i], batch.labels[i])
    return result


def reference_attribute(model_a: nn.Module, model_b: nn.Module, loader: Iterable, steps: int = 100,
                        method: str = "riemann_left", keep_per_image: bool = False, filters: str = "conv",
                        mode: str = "eval") -> Attribution:
    """FAIG over a dataset with the naive loop; same result type as :func:`faig_fast.attribute`."""
    check_pair(model_a, model_b)
    check_mode(mode)
    nodes_and_weights(method, steps)
    index = FilterIndex.from_model(model_b, filters=filters)
    meta = {"steps": steps, "method": method, "engine": "reference", "filters": filters, "mode": mode}
    result = Attribution(index, meta, keep_per_image)
    return score_images(result, loader, model_scale(model_b), lambda lq, gt: filter_scores(
        reference_image_faig(model_a, model_b, lq, gt, steps, method, mode), index))
