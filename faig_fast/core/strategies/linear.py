"""The ``linear`` strategy: conv(h, θ + αΔ) = conv(h, θ) + α·conv(h, Δ), a chunk of steps as one batch.

Only for models whose parameters all belong to plain zero-padded ``nn.Conv2d`` layers, with no
floating buffers and no batch norm (:func:`linear_path_blocker`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from faig_fast.core.strategies.base import ImageResult, Strategy, over_steps
from faig_fast.errors import InvalidInputError
from faig_fast.ops.linear_path import linear_path_combine


def linear_path_blocker(model: nn.Module) -> str | None:
    """Why the ``linear`` strategy cannot run ``model`` correctly, or ``None`` when it can."""
    owned = set()
    for prefix, m in model.named_modules():
        where = f"'{prefix or type(model).__name__}'"
        if m.training:
            return f"module {where} is in train mode (the linear path runs the steps as one batch)"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return f"{where} is a batch norm, which would mix the steps batched together"
        if isinstance(m, nn.Conv2d):
            if type(m).forward is not nn.Conv2d.forward or "forward" in vars(m) or m._forward_hooks \
                    or m._forward_pre_hooks:
                return f"conv {where} has its own forward or hooks"
            if m.padding_mode != "zeros":
                return f"conv {where} uses padding_mode='{m.padding_mode}'"
            owned.update(f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters(recurse=False))
    for n, b in model.named_buffers():
        if b.is_floating_point():
            return f"it has a floating buffer '{n}'"
    for n, _ in model.named_parameters():
        if n not in owned:
            return f"parameter '{n}' is not the weight or bias of a plain nn.Conv2d"
    return None


class Linear(Strategy):
    """Per image, chunks of steps through dense convolutions with the stacked weight [θ; Δ]; α is a
    differentiable input, so autograd gives w_k·f_k with the gradients."""

    name = "linear"

    def blocker(self) -> str | None:
        return linear_path_blocker(self.engine.net)

    def integrate(self, lq: torch.Tensor, gt: torch.Tensor, alphas: torch.Tensor,
                  weights: torch.Tensor) -> list[ImageResult]:
        out = []
        for i in range(lq.shape[0]):
            x, y = lq[i:i + 1], gt[i:i + 1]
            grads, slopes = over_steps(self.engine, x, 1, alphas, weights,
                                       lambda a, w, x=x, y=y: self.chunk(x, y, a, w), factor=3)
            out.append(ImageResult(grads, slopes))
        return out

    def chunk(self, x: torch.Tensor, y: torch.Tensor, alphas: torch.Tensor,
              weights: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """(Σ_k w_k g_k, w_k·f_k (steps,)) for one image and a chunk of steps."""
        e = self.engine
        params = {n: t.clone().requires_grad_() for n, t in e.theta.items()}
        a = alphas.detach().clone().requires_grad_()
        with _linear_path(e.net, params, e.delta, a), e.runner.autocast():
            out = e.net(x.clone())
        if out.shape[0] != a.shape[0]:
            out = out.expand(a.shape[0], *out.shape[1:])
        loss = (weights * e.loss(out, y.expand(out.shape[0], *y.shape[1:]))).sum()
        if not torch.isfinite(loss):
            raise InvalidInputError(
                f"strategy 'linear' gave a non-finite loss on {e.name}: the model reads conv weights outside "
                "nn.Conv2d.forward (e.g. F.conv2d(x, self.conv.weight)); use strategy 'loop' or 'persample'")
        *gs, ga = torch.autograd.grad(loss, [*params.values(), a], allow_unused=True)
        grads = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(e.param_names, gs)}
        return grads, torch.zeros_like(a) if ga is None else ga


class _FusedCombine(torch.autograd.Function):
    """y = a + α·b + bias with the fused Triton epilogue forward and an exact PyTorch backward."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, alphas: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(b, alphas)
        ctx.has_bias = bias is not None
        return linear_path_combine(a, b, alphas.detach(), None if bias is None else bias.detach(), None,
                                   backend="triton")

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        b, alphas = ctx.saved_tensors
        gb = g * alphas.to(g.dtype).view(-1, 1, 1, 1)
        galpha = (g * b).sum((1, 2, 3)).to(alphas.dtype) if ctx.needs_input_grad[2] else None
        return g, gb, galpha, g.sum((2, 3)) if ctx.has_bias else None


def _stacked(w: torch.Tensor, dw: torch.Tensor, groups: int) -> torch.Tensor:
    """[w; Δw] along output channels, interleaved per group so each group keeps its own inputs."""
    if groups == 1:
        return torch.cat([w, dw])
    g = (groups, w.shape[0] // groups, *w.shape[1:])
    return torch.stack([w.reshape(g), dw.reshape(g)], 1).reshape(2 * w.shape[0], *w.shape[1:])


def _split(y: torch.Tensor, c: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The conv(h, w) and conv(h, Δw) halves of a conv with :func:`_stacked` weights."""
    if groups == 1:
        return y[:, :c], y[:, c:]
    y = y.unflatten(1, (groups, 2, c // groups))
    return y[:, :, 0].flatten(1, 2), y[:, :, 1].flatten(1, 2)


def linear_path_conv(x: torch.Tensor, w: torch.Tensor, dw: torch.Tensor, b: torch.Tensor | None,
                     db: torch.Tensor | None, alphas: torch.Tensor, conv: nn.Conv2d,
                     fused: bool | None = None) -> torch.Tensor:
    """conv(x, w + αΔw) + b + αΔb for a batch of α, as one conv with stacked weights [w; Δw].

    ``x`` has batch S (one sample per α) or 1 (the same input for every α, e.g. the first layer).
    ``fused`` (default: on CUDA) runs the combine as the Triton epilogue.
    """
    c = w.shape[0]
    y = F.conv2d(x, _stacked(w, dw.to(w.dtype), conv.groups), None, conv.stride, conv.padding, conv.dilation,
                 conv.groups)
    ya, yb = _split(y, c, conv.groups)
    a = alphas.to(y.dtype).view(-1, 1, 1, 1)
    bias = None if b is None else (b[None] + a.view(-1, 1) * db[None]).to(y.dtype)
    if fused is None:
        fused = y.is_cuda
    if fused and y.shape[0] == alphas.shape[0]:
        return _FusedCombine.apply(ya, yb, alphas.to(y.dtype), bias)
    out = ya + a * yb
    return out if bias is None else out + bias[:, :, None, None]


@contextlib.contextmanager
def _linear_path(net: nn.Module, params: dict, delta: dict, alphas: torch.Tensor) -> Iterator[None]:
    """Temporarily route every Conv2d of ``net`` through :func:`linear_path_conv`.

    The network's own conv tensors hold NaN meanwhile, so a forward that reads them outside
    ``Conv2d.forward`` gives a non-finite loss instead of a silently wrong gradient.
    """
    patched = []
    own = {n: p for n, p in net.named_parameters() if p.is_floating_point()}
    canonical = {id(p): n for n, p in own.items()}  # a tied weight is keyed by its first name
    with torch.no_grad():
        for p in own.values():
            p.fill_(float("nan"))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            wn = canonical[id(m.weight)]
            bn = canonical[id(m.bias)] if m.bias is not None else None

            def fwd(x, m=m, wn=wn, bn=bn):
                return linear_path_conv(x, params[wn], delta[wn], params[bn] if bn else None,
                                        delta[bn] if bn else None, alphas, m)
            m.forward = fwd
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(params[n])
