"""Quadrature rules for the path integral of Eq. 5 on α ∈ [0, 1].

Names follow Captum.  ``riemann_left`` with α_k = k/N is the paper's Eq. 6 and the default.
"""
from __future__ import annotations

import numpy as np
import torch

from faig_fast.errors import InvalidInputError

#: The fewest Gauss–Legendre nodes whose top-1% sets agree with a converged integral at least as
#: well as the paper's Riemann N=100 (measured by ``faig study quadrature``; README, "Quadrature").
FAST_GL_NODES = 8

METHODS = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid", "gausslegendre")

#: Most nodes a rule accepts (each node is one forward+backward per image).  numpy's Gauss–Legendre
#: solver needs O(n²) memory and O(n³) time (10⁹ nodes would try to allocate exabytes; 1000 nodes
#: already take seconds); the paper's rule uses 100 Riemann steps and 8 Gauss–Legendre nodes match it.
MAX_STEPS = {"gausslegendre": 256}
MAX_RIEMANN_STEPS = 100_000


def nodes_and_weights(method: str = "riemann_left", steps: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """α nodes and weights (float64) such that ∫₀¹ f(α) dα ≈ Σ_k w_k f(α_k)."""
    if method not in METHODS:
        raise InvalidInputError(f"unknown quadrature method '{method}'; choose one of {', '.join(METHODS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InvalidInputError(f"steps must be a positive integer, got {steps!r}")
    n = int(steps)
    cap = MAX_STEPS.get(method, MAX_RIEMANN_STEPS)
    if n > cap:
        raise InvalidInputError(f"steps={n} is too many for {method}: use 1 to {cap} "
                                f"(the paper uses riemann_left with 100; gausslegendre needs about 8)")
    k = np.arange(n, dtype=np.float64)
    if method == "riemann_left":
        a, w = k / n, np.full(n, 1.0 / n)
    elif method == "riemann_right":
        a, w = (k + 1) / n, np.full(n, 1.0 / n)
    elif method == "riemann_middle":
        a, w = (k + 0.5) / n, np.full(n, 1.0 / n)
    elif method == "riemann_trapezoid":
        if n < 2:
            raise InvalidInputError("riemann_trapezoid needs steps >= 2")
        a = k / (n - 1)
        w = np.full(n, 1.0 / (n - 1))
        w[0] = w[-1] = 0.5 / (n - 1)
    else:
        x, wx = np.polynomial.legendre.leggauss(n)
        a, w = (x + 1) / 2, wx / 2
    return torch.from_numpy(a), torch.from_numpy(w)
