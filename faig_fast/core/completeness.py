"""The completeness check of Eq. 4: Σ_i FAIG_i over every path tensor must equal L(θ̄) − L(θ) up to
what the quadrature rule explains; a path integral that does not add up is a silent wrong answer,
so :class:`CompletenessGuard` warns (:class:`~faig_fast.errors.CompletenessWarning`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from faig_fast.errors import CompletenessWarning

#: Extra cost the completeness check may add: it runs 2 forward passes per checked image, against
#: ≥ 2·steps forward-equivalents (forward + backward per step) to integrate that image.
CHECK_COST = 0.05
#: Loss changes below this fraction of the loss (by precision) are measured against that fraction: on
#: an image both models restore about equally well, ΔL is a small difference of large losses and the
#: quadrature error of f(α) = dL/dα, whose size follows the loss rather than ΔL, dominates it
#: (measured: 0.7 % loss change, error 1.2·|ΔL| with 4 Riemann steps, falling as 1/N).
LOSS_FLOOR = {"fp64": 0.05, "fp32": 0.05, "tf32": 0.1, "bf16": 0.2}


def completeness_tolerance(method: str, steps: int) -> float:
    """The largest completeness error (see :meth:`CompletenessGuard.error`) a quadrature rule with
    ``steps`` nodes explains.

    The error e = |S − ΔL| / max(|S|, |ΔL|) (S = Σ_i FAIG_i, ΔL = L(θ̄) − L(θ)) lies in [0, 2]: e ≈ 1
    when one of them is negligible next to the other (a path integral unrelated to the loss change),
    ≈ 2 when they have opposite signs.  The left/right Riemann sums err by ≈ |f(1) − f(0)| / (2N)
    with f(α) = dL/dα (first order in 1/N); the midpoint, trapezoid and Gauss–Legendre rules are of
    (at least) second order.  Allowing |f(1) − f(0)| up to 20·max(|S|, |ΔL|) gives 10/N^order; the
    bound never goes below 0.25 (ReLU kinks, curved paths) nor above 0.75, so an unrelated path
    integral (e ≈ 1) always trips it.  Rules with N^order < 4 are too coarse for any bound below 1
    (:func:`too_coarse`): the check is skipped for them.
    """
    return min(0.75, max(0.25, 10.0 / steps ** _order(method)))


def _order(method: str) -> int:
    return 1 if method in ("riemann_left", "riemann_right") else 2


def too_coarse(method: str, steps: int) -> bool:
    """True for rules (e.g. Riemann with < 4 steps) whose error can reach that of an unrelated integral."""
    return steps ** _order(method) < 4


@dataclass
class Check:
    """One image's Σ_i FAIG_i over every parameter and its endpoint losses L(θ), L(θ̄) (0-d tensors)."""

    total: torch.Tensor
    loss_target: torch.Tensor
    loss_baseline: torch.Tensor


HostCheck = tuple  # (Σ FAIG, L(θ), L(θ̄)) as floats


def checks_to_host(checks: Sequence[Check | None]) -> list[HostCheck | None]:
    """Device checks as float triples, in one transfer (no sync per image)."""
    present = [c for c in checks if c is not None]
    if not present:
        return [None] * len(checks)
    flat = torch.stack([torch.stack([c.total, c.loss_target, c.loss_baseline]).double() for c in present])
    rows = iter(flat.cpu().tolist())
    return [tuple(next(rows)) if c is not None else None for c in checks]


def relative_delta(check: HostCheck) -> float:
    """|Σ_i FAIG_i − (L(θ̄) − L(θ))| / |L(θ̄) − L(θ)|: the convergence delta of Eq. 4."""
    total, l_target, l_baseline = check
    diff = l_baseline - l_target
    return abs(total - diff) / max(abs(diff), 1e-12)


class CompletenessGuard:
    """Eq. 4 on a sample of images: the first, then every ``every``-th, so that the two extra
    forward passes per checked image cost at most ``CHECK_COST`` of the run."""

    def __init__(self, method: str, steps: int, precision: str, enabled: bool, every_image: bool,
                 skip_reason: str | None = None):
        self.method, self.steps = method, steps
        if skip_reason is None and too_coarse(method, steps):
            skip_reason = f"the {method} rule with {steps} steps is too coarse to check"
        self.enabled = enabled and skip_reason is None
        self.every_image = every_image
        self.every = 1 if every_image else max(1, math.ceil(1.0 / (CHECK_COST * steps)))
        self.tolerance = completeness_tolerance(method, steps)
        self.floor = LOSS_FLOOR.get(precision, 0.05)
        self.skip_reason = skip_reason if enabled else "check_completeness=False"

    def wants(self, position: int) -> bool:
        return self.every_image or (self.enabled and position % self.every == 0)

    def error(self, check: HostCheck) -> float:
        """|S − ΔL| / max(|S|, |ΔL|, floor·max(L(θ), L(θ̄))); NaN/Inf give +Inf.

        The floor keeps images that both models restore about equally well (ΔL ≈ 0, where any
        relative error is cancellation) from tripping the check.
        """
        total, l_target, l_baseline = check
        if not all(math.isfinite(v) for v in check):
            return math.inf
        diff = l_baseline - l_target
        scale = max(abs(total), abs(diff), self.floor * max(abs(l_target), abs(l_baseline)), 1e-30)
        return abs(total - diff) / scale

    def report(self, items: Sequence[tuple[int, str, HostCheck | None]]) -> dict:
        """Summary for ``meta["completeness"]``; warns (CompletenessWarning) when an image fails."""
        if not self.enabled:
            return {"checked": 0, "skipped": self.skip_reason}
        checked = [(p, n, c) for p, n, c in items if c is not None]
        errors = [self.error(c) for _, _, c in checked]
        bad = [i for i, e in enumerate(errors) if e > self.tolerance]
        out = {"checked": len(checked), "every": self.every, "tolerance": self.tolerance,
               "images": [n for _, n, _ in checked], "delta": [relative_delta(c) for _, _, c in checked],
               "error": errors, "flagged": len(bad)}
        if bad:
            worst = max(bad, key=lambda i: errors[i])
            _, name, (total, l_target, l_baseline) = checked[worst]
            warnings.warn(
                f"FAIG completeness check failed on {len(bad)} of {len(checked)} checked images: on '{name}' "
                f"Σ FAIG = {total:.6g} but L(θ̄) − L(θ) = {l_baseline - l_target:.6g} (completeness error "
                f"{errors[worst]:.3g}, the {self.method} rule with {self.steps} steps explains ≤ "
                f"{self.tolerance:.3g}). The model probably changes between forward passes (edits its input or "
                "weights in place, counts calls, draws random numbers), or the pair is too far apart for this "
                "rule (try more steps or method='gausslegendre'): the scores may be wrong.",
                CompletenessWarning, stacklevel=4)
        return out
