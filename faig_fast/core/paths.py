"""The straight parameter path γ(α) = θ + α(θ̄ − θ) between two models, for any ``nn.Module``.

The path runs over exactly the floating-point parameters (canonical names: ``named_parameters()``,
so a tied tensor counts once under its first name; frozen ones included) and the floating buffers,
persistent or not (``named_buffers()``, e.g. BatchNorm running statistics).  Integer and bool
buffers (``num_batches_tracked``, ``relative_position_index``) are not interpolated: every pass sees
model_b's values, reset before each pass.
"""
from __future__ import annotations

import torch
from torch import nn

from faig_fast.errors import InvalidInputError


def floating_parameters(net: nn.Module) -> dict[str, nn.Parameter]:
    """Canonical floating-point parameters (first name of a tied tensor), in ``named_parameters`` order."""
    return {n: p for n, p in net.named_parameters() if p.is_floating_point()}


class ParameterPath:
    """θ (model_b), Δ = θ̄ − θ and the fixed integer buffers, as private tensors on one device.

    Nothing here aliases a tensor of the caller's models: θ is cloned from the engine's own copy of
    model_b and Δ is a fresh difference, so a forward that writes into what it is given cannot reach
    the caller.
    """

    def __init__(self, net: nn.Module, model_a: nn.Module):
        params = floating_parameters(net)
        buffers = dict(net.named_buffers())
        a_tensors = {**dict(model_a.named_parameters()), **dict(model_a.named_buffers())}
        self.param_names = list(params)
        self.buffer_names = [n for n, b in buffers.items() if b.is_floating_point()]
        self.fixed_names = [n for n, b in buffers.items() if not b.is_floating_point()]
        self.theta = {n: p.detach().clone() for n, p in params.items()}
        self.delta = {n: _other(a_tensors, n, t) - t for n, t in self.theta.items()}
        self.buf_theta = {n: buffers[n].detach().clone() for n in self.buffer_names}
        self.buf_delta = {n: _other(a_tensors, n, t) - t for n, t in self.buf_theta.items()}
        self.fixed = {n: buffers[n].detach().clone() for n in self.fixed_names}

    def params_at(self, alpha: float | torch.Tensor, base: dict[str, torch.Tensor] | None = None) -> dict:
        """θ + αΔ for every path parameter (new tensors; ``base`` replaces θ, e.g. for autograd)."""
        base = self.theta if base is None else base
        return {n: base[n] + alpha * self.delta[n] for n in self.param_names}

    def buffers_at(self, alpha: float | torch.Tensor, base: dict[str, torch.Tensor] | None = None) -> dict:
        """Floating buffers at α and fresh copies of the integer buffers (new tensors).  A tensor α is
        detached here: buffers have no gradient (BatchNorm's running statistics are not differentiable)."""
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.detach()
        base = self.buf_theta if base is None else base
        out = {n: base[n] + alpha * self.buf_delta[n] for n in self.buffer_names}
        out.update({n: t.clone() for n, t in self.fixed.items()})
        return out

    def load_into(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], alpha: float,
                  buffer_alpha: float | None = None) -> None:
        """Write θ + αΔ (buffers at ``buffer_alpha``, default α; the fixed buffers reset) into a
        network's own tensors, in place, without autograd."""
        b_alpha = alpha if buffer_alpha is None else buffer_alpha
        with torch.no_grad():
            for n in self.param_names:
                torch.add(self.theta[n], self.delta[n], alpha=alpha, out=params[n])
            for n in self.buffer_names:
                torch.add(self.buf_theta[n], self.buf_delta[n], alpha=b_alpha, out=buffers[n])
            for n, t in self.fixed.items():
                buffers[n].copy_(t)

    def slope(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ over path parameters of g·Δ for per-parameter gradients ``grads`` (a leading batch dim
        allowed), as float64: the parameters' share of dL/dα."""
        total = None
        for n in self.param_names:
            g = grads.get(n)
            if g is None:
                continue
            lead = g.dim() - self.delta[n].dim()
            part = (g.reshape(*g.shape[:lead], -1) @ self.delta[n].reshape(-1).to(g.dtype)).double()
            total = part if total is None else total + part
        if total is None:
            return next(iter(self.theta.values())).new_zeros((), dtype=torch.float64)
        return total


def _other(tensors: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    if name not in tensors:
        raise InvalidInputError(f"model_a has no parameter or buffer '{name}' (model_b has)")
    return tensors[name].detach().to(like.device, like.dtype)
