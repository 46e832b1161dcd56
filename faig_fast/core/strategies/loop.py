"""The ``loop`` strategy: one forward+backward per node, in the private network's own tensors."""
from __future__ import annotations

import torch

from faig_fast.core.strategies.base import ImageResult, Strategy


class Loop(Strategy):
    """θ + α_kΔ is written in place into the private network's tensors (no ``functional_call``, no
    copies), then one plain autograd pass per node.  On CPU the pass runs in channels-last layout
    (oneDNN's fast path: ≈ 9% faster forward+backward for MSRResNet 16×64 on 32–64 px inputs);
    gradients come back in the usual layout.  Each pass gets a fresh copy of ``x`` and of the
    integer buffers.  Works for any model autograd can differentiate."""

    name = "loop"

    def integrate(self, lq: torch.Tensor, gt: torch.Tensor, alphas: torch.Tensor,
                  weights: torch.Tensor) -> list[ImageResult]:
        return [self.image(lq[i:i + 1], gt[i:i + 1], alphas, weights) for i in range(lq.shape[0])]

    def image(self, x: torch.Tensor, y: torch.Tensor, alphas: torch.Tensor, weights: torch.Tensor) -> ImageResult:
        e = self.engine
        net, space = e.net, e.space
        channels_last = e.device.type == "cpu" and x.dim() == 4
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        total = {n: torch.zeros_like(e.theta[n]) for n in e.param_names}
        slopes, unused = [], set()
        with e.runner.cpu_layout(channels_last):
            params = dict(net.named_parameters())
            buffers = dict(net.named_buffers())
            leaves = [params[n].requires_grad_() for n in e.param_names]
            try:
                for alpha, w in zip(alphas.tolist(), weights.tolist()):
                    space.load_into(params, buffers, alpha)
                    with e.runner.autocast():
                        out = net(x.clone())
                    gs = torch.autograd.grad(e.loss(out, y).sum(), leaves, allow_unused=True)
                    node = {}
                    for n, g in zip(e.param_names, gs):
                        if g is None:
                            unused.add(n)
                        else:
                            total[n].add_(g, alpha=w)
                            node[n] = g
                    slopes.append(space.slope(node))
            finally:
                for p in leaves:
                    p.requires_grad_(False)
        e.note_unused([n for n in e.param_names if n in unused])
        return ImageResult(total, torch.stack(slopes))
