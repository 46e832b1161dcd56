"""The ``vmap`` strategy: ``torch.func`` over a chunk of steps and the images of a batch."""
from __future__ import annotations

import torch
from torch.func import grad, vmap

from faig_fast.core.strategies.base import ImageResult, Strategy, over_steps, split_images


class VMap(Strategy):
    """``vmap`` over a chunk of steps (and over images of equal size), with the gradient taken w.r.t.
    the shared base θ, so the weighted sum over steps falls out of autograd; the α of each step is a
    differentiable input too, so autograd also gives w_k·f_k."""

    name = "vmap"
    transforms = True

    def integrate(self, lq: torch.Tensor, gt: torch.Tensor, alphas: torch.Tensor,
                  weights: torch.Tensor) -> list[ImageResult]:
        grads, slopes = over_steps(self.engine, lq[:1], lq.shape[0], alphas, weights,
                                   lambda a, w: self.chunk(lq, gt, a, w))
        return split_images(grads, slopes)

    def chunk(self, lq: torch.Tensor, gt: torch.Tensor, alphas: torch.Tensor,
              weights: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """(Σ_k w_k g_k per image {name: (B, ...)}, w_k·f_k (B, steps)) for a chunk of steps."""
        e = self.engine
        space = e.space

        def image_loss(base: dict, a: torch.Tensor, buf_base: dict, x: torch.Tensor, y: torch.Tensor):
            def step(ak: torch.Tensor, wk: torch.Tensor) -> torch.Tensor:
                return wk * e.image_loss(space.params_at(ak, base), space.buffers_at(ak, buf_base), x, y)
            return vmap(step)(a, weights).sum()

        # outside eval mode a forward may update its buffers in place (BatchNorm running statistics):
        # each image then gets its own copy, batched like the images
        per_image = e.mode != "eval"
        buf_base = {n: t.expand(lq.shape[0], *t.shape).clone() for n, t in space.buf_theta.items()} \
            if per_image else space.buf_theta
        fn = vmap(grad(image_loss, argnums=(0, 1)), in_dims=(None, None, 0 if per_image else None, 0, 0))
        return fn(e.theta, alphas, buf_base, lq, gt)
