"""The completeness check of Eq. 4: Σ_i FAIG_i over every path tensor must equal L(θ̄) − L(θ) up to
what the quadrature rule explains for that run; a path integral that does not add up is a silent
wrong answer, so :class:`CompletenessGuard` warns (:class:`~faig_fast.errors.CompletenessWarning`).

Σ has two shares: the parameters' (Σ_i Δ_i·ḡ_i, what the scores are made of) and the floating
buffers' (BatchNorm running statistics move along the path too, γ_b(α) = b + α(b̄ − b), but autograd
cannot differentiate them, so their share ∫ ∂L/∂b·Δb dα is taken by central differences at the rule's
own nodes, :func:`buffer_slopes`).

What the rule explains is estimated per image from the node slopes f_k = dL/dα(α_k) the engine
returns (:class:`ErrorModel`): a signed estimate of the rule's smooth error (Richardson extrapolation
for the Riemann rules, Euler–Maclaurin for midpoint and trapezoid), which is removed, plus a
roughness term for what no smooth model sees (ReLU switching makes f jump along the path; bf16
makes every f_k noisy), plus a rounding floor per precision for the endpoint losses.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from faig_fast.core.quadrature import nodes_and_weights
from faig_fast.errors import CompletenessWarning

#: Extra cost the check may add to a run, in forward passes: 2 per checked image (the endpoint
#: losses), plus 2 per node when floating buffers move (:func:`buffer_slopes`), against ≥ 2·steps
#: forward-equivalents (a forward and a backward per node) to integrate one image.
CHECK_COST = 0.05
#: Fewest nodes whose own slopes can estimate the rule's error (second differences, Richardson).
MIN_NODES = 4
#: Rounding floor of |Σ − ΔL| per precision, as a fraction of max(L(θ), L(θ̄)).  Measured on the tiny
#: zoo, both shipped tiny pairs and a two-branch net (CPU, 8–24 px LR) against fp64: the endpoint
#: losses err by ≤ 1.3e-7·L in fp32 and ≤ 3.1e-3·L under bf16 autocast, Σ by ≤ 1e-5·L (fp32) and
#: ≤ 1.9e-3·L (bf16).  tf32 (GPU only, 10-bit mantissa against bf16's 7) is set between.
ROUNDING = {"fp64": 1e-9, "fp32": 3e-5, "tf32": 2e-3, "bf16": 1e-2}
#: Multiple of the roughness estimate that the rule explains.  Measured |Σ − ΔL| / roughness on
#: valid runs: ≤ 1.2 (Gauss–Legendre 8) and ≤ 3.1 (Riemann-left 100, after Richardson) in fp32.
ROUGHNESS_FACTOR = 4.0
#: Share of the smooth-error estimate itself that may be wrong (it is a leading-order estimate).
SMOOTH_SLACK = 0.1
#: The rule never explains more than this share of the path's scale max(|Σ|, |ΔL|, ∫|dL/dα|): an
#: integral unrelated to the loss change (error ≈ 1) always trips the check.
MAX_EXPLAINED = 0.5


def fd_step(precision: str) -> float:
    """Central-difference step h (in units of the path, α ± h) for the buffers' share.

    The error of (L(α + h) − L(α − h)) / 2h is ≈ h²/6·|L'''| (truncation; ReLUs that switch between
    α ± h make it ≈ h·|jump| instead) plus ≈ ε·L/h (rounding, ε the relative noise of one loss).  In
    fp64 ε ≈ 1e-15 and h = 1e-4 leaves both ≲ 1e-8·L.  In fp32 (ε ≈ 1e-7) h = 1e-3 balances them:
    measured ≤ 1e-4·L on BatchNorm nets against fp64, below the roughness term of the same nodes.
    Under bf16 autocast one loss is noisy by ≈ 3e-3·L, but two passes that share every parameter
    round the same pre-normalisation values identically, so the noise of the difference grows only
    as √h: h = 0.1 measured ≤ 1e-3·L (h = 0.03 and 0.3: ≤ 2e-3 and ≤ 6e-3), inside the bf16 floor.
    """
    return {"fp64": 1e-4, "fp32": 1e-3, "tf32": 3e-2, "bf16": 0.1}.get(precision, 1e-3)


# -------------------------------------------------------------------------------- the rule's error
@dataclass(frozen=True)
class ErrorModel:
    """Linear functionals of the node slopes f (N,) that estimate a rule's error on that f.

    ``correction``·f ≈ Σ_k w_k f_k − ∫₀¹ f (signed, the smooth leading-order error);
    ‖``roughness`` @ f‖₂ ≈ the size of what remains (jumps of f, per-node noise).
    """

    weights: torch.Tensor
    correction: torch.Tensor
    roughness: torch.Tensor


@functools.lru_cache(maxsize=64)
def error_model(method: str, steps: int) -> ErrorModel:
    """The :class:`ErrorModel` of a rule (float64, CPU; cached)."""
    alphas, weights = nodes_and_weights(method, steps)
    w = weights.numpy()
    if too_coarse(method, steps):  # only the convergence delta is asked for: no error estimate
        zero = torch.zeros(len(w), dtype=torch.float64)
        return ErrorModel(weights, zero, zero[None])
    if method == "gausslegendre":
        correction, roughness = np.zeros_like(w), _legendre_tail(alphas.numpy(), w)
    else:
        correction, roughness = _riemann_correction(method, w), _second_differences(len(w), float(w.max()))
    return ErrorModel(weights, torch.from_numpy(correction), torch.from_numpy(roughness))


def _riemann_correction(method: str, w: np.ndarray) -> np.ndarray:
    """Signed error estimate of an equally spaced rule.

    Left/right (first order): Richardson with the same rule on every other node, each carrying its
    neighbour's weight (S_{N/2} − S_N = E_{N/2} − E_N ≈ E_N).  Midpoint/trapezoid (second order):
    the Euler–Maclaurin term ∓h²/c·(f'(1) − f'(0)) with one-sided differences of the end nodes.
    """
    n = len(w)
    if method in ("riemann_middle", "riemann_trapezoid"):
        h = 1.0 / n if method == "riemann_middle" else 1.0 / (n - 1)
        row = np.zeros(n)
        row[[n - 1, n - 2, 1, 0]] += [1.0, -1.0, -1.0, 1.0]
        return row * (-h / 24 if method == "riemann_middle" else h / 12)
    sub = np.zeros(n)
    anchors = range(0, n, 2) if method == "riemann_left" else range(n - 1, -1, -2)
    step = 1 if method == "riemann_left" else -1
    for k in anchors:
        sub[k] += w[k]
        if 0 <= k + step < n:
            sub[k] += w[k + step]
    return sub - w


def _second_differences(n: int, h: float) -> np.ndarray:
    """h·(f_{k+1} − 2f_k + f_{k−1})/√6, h the node spacing: for per-node noise σ, ‖·‖₂ ≈ h√N·σ,
    the noise of Σ_k h f_k; a jump J of f between two nodes gives ≈ 0.6·h·J, the size of its error."""
    rows = np.zeros((n - 2, n))
    for k in range(1, n - 1):
        rows[k - 1, k - 1:k + 2] = [1.0, -2.0, 1.0]
    return rows * (h / math.sqrt(6))


def _legendre_tail(alphas: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The upper half of f's Legendre coefficients c_j = (2j+1)·Σ_k w_k f_k P_j(2α_k − 1), j ≥ n/2
    (exact for the degree-(n−1) interpolant at Gauss nodes), scaled so ‖·‖₂ is their RMS.  Gauss–
    Legendre is exact to degree 2n−1: its error comes from the spectrum beyond, whose level the tail
    shows (a rough f keeps a flat spectrum; a smooth one decays and the estimate over-covers it)."""
    n = len(w)
    x = 2 * alphas - 1
    js = range(max(1, (n + 1) // 2), n)
    rows = [(2 * j + 1) * w * np.polynomial.legendre.legval(x, np.eye(j + 1)[j]) for j in js]
    return np.array(rows) / math.sqrt(len(rows))


def too_coarse(method: str, steps: int) -> bool:
    """True for rules with fewer than :data:`MIN_NODES` nodes: their slopes cannot estimate their error."""
    return steps < MIN_NODES


# -------------------------------------------------------------------------------- one image
@dataclass
class Check:
    """One image's shares of Σ (parameters, floating buffers), its endpoint losses and the rule's error
    estimates (all 0-d float64 tensors on the engine's device)."""

    params: torch.Tensor
    buffers: torch.Tensor
    loss_target: torch.Tensor
    loss_baseline: torch.Tensor
    correction: torch.Tensor
    roughness: torch.Tensor
    variation: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.params, self.buffers, self.loss_target, self.loss_baseline, self.correction,
                self.roughness, self.variation]


#: A :class:`Check` on the host: (Σ params, Σ buffers, L(θ), L(θ̄), smooth error, roughness, ∫|dL/dα|).
HostCheck = tuple


def image_check(engine, img, lq: torch.Tensor, gt: torch.Tensor, method: str, steps: int) -> Check:
    """The completeness check of one image ``lq`` (1,C,h,w), ``gt`` (1,C',H,W) integrated as ``img``
    (an :class:`~faig_fast.core.engine.ImageResult`): device tensors only, no host sync."""
    dev = engine.device
    total = torch.zeros((), dtype=torch.float64, device=dev)
    for n in engine.param_names:
        g = img.grads.get(n)
        if g is not None:
            total = total + (engine.delta[n].double() * g.double()).sum()
    model = error_model(method, steps)
    w = model.weights.to(dev)
    f = img.slopes.to(dev, torch.float64)
    shares = total.new_zeros(())
    if engine.buffers_move:
        g_b = buffer_slopes(engine, lq, gt, method, steps)
        shares = (w * g_b).sum()
        f = f + g_b
    return Check(total, shares, engine.loss_at(0.0, lq, gt), engine.loss_at(1.0, lq, gt),
                 (model.correction.to(dev) * f).sum(), torch.linalg.vector_norm(model.roughness.to(dev) @ f),
                 (w * f.abs()).sum())


def buffer_slopes(engine, lq: torch.Tensor, gt: torch.Tensor, method: str, steps: int) -> torch.Tensor:
    """∂L/∂β·(b̄ − b) at each node (N,) float64: the floating buffers' share of dL/dα, by central
    differences (L(θ(α_k), b(α_k + h)) − L(θ(α_k), b(α_k − h))) / 2h, h = :func:`fd_step`."""
    alphas, _ = nodes_and_weights(method, steps)
    h = fd_step(engine.precision)
    rows = [(engine.loss_at(a, lq, gt, buffer_alpha=a + h) - engine.loss_at(a, lq, gt, buffer_alpha=a - h))
            / (2 * h) for a in alphas.tolist()]
    return torch.stack(rows)


def checks_to_host(checks: Sequence[Check | None]) -> list[HostCheck | None]:
    """Device checks as float tuples, in one transfer (no sync per image)."""
    present = [c for c in checks if c is not None]
    if not present:
        return [None] * len(checks)
    flat = torch.stack([torch.stack(c.tensors()).double() for c in present])
    rows = iter(flat.cpu().tolist())
    return [tuple(next(rows)) if c is not None else None for c in checks]


def relative_delta(check: HostCheck) -> float:
    """|Σ_i FAIG_i − (L(θ̄) − L(θ))| / |L(θ̄) − L(θ)|: the convergence delta of Eq. 4, with Σ over the
    parameters and the floating buffers."""
    params, buffers, l_target, l_baseline = check[:4]
    diff = l_baseline - l_target
    return abs(params + buffers - diff) / max(abs(diff), 1e-12)


# -------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class Verdict:
    """One checked image: |Σ − ΔL| after removing the rule's smooth error (``residual``), what the rule
    explains (``allowed``) and the scale both are reported against (max(|Σ|, |ΔL|))."""

    residual: float
    allowed: float
    scale: float

    @property
    def flagged(self) -> bool:
        return not self.residual <= self.allowed  # NaN flags


def judge(check: HostCheck, precision: str) -> Verdict:
    """Σ (parameters + buffers) against ΔL = L(θ̄) − L(θ), with what the rule explains for this image:
    ROUGHNESS_FACTOR·roughness + SMOOTH_SLACK·|smooth error| + the rounding floor, capped at
    MAX_EXPLAINED of the path's scale."""
    params, buffers, l_target, l_baseline, correction, roughness, variation = check
    total, diff = params + buffers, l_baseline - l_target
    if not all(math.isfinite(v) for v in check):
        return Verdict(math.inf, 0.0, 1.0)
    residual = abs(total - correction - diff)
    allowed = (ROUGHNESS_FACTOR * roughness + SMOOTH_SLACK * abs(correction)
               + ROUNDING.get(precision, ROUNDING["fp32"]) * max(abs(l_target), abs(l_baseline)))
    allowed = min(allowed, MAX_EXPLAINED * max(abs(total), abs(diff), variation))
    return Verdict(residual, allowed, max(abs(total), abs(diff), 1e-30))


class CompletenessGuard:
    """Eq. 4 on a sample of images: the first, then every ``every``-th, so that the check's forward
    passes cost at most ``CHECK_COST`` of the run (all of them when ``every_image``, e.g. for
    convergence deltas).  Warns once when the check is skipped, and when an image fails it."""

    def __init__(self, method: str, steps: int, precision: str, enabled: bool, every_image: bool,
                 buffers_move: bool):
        self.method, self.steps, self.precision = method, steps, precision
        self.buffers_move = buffers_move
        self.skip_reason = None
        if not enabled:
            self.skip_reason = "check_completeness=False"
        elif too_coarse(method, steps):
            self.skip_reason = (f"the {method} rule with {steps} steps is too coarse to check (its own error "
                                f"cannot be estimated from fewer than {MIN_NODES} nodes)")
        self.enabled = self.skip_reason is None
        self.every_image = every_image
        cost = 2 + (2 * steps if buffers_move else 0)
        self.every = 1 if every_image else max(1, math.ceil(cost / (CHECK_COST * 2 * steps)))

    def wants(self, position: int) -> bool:
        return self.every_image or (self.enabled and position % self.every == 0)

    def report(self, items: Sequence[tuple[int, str, HostCheck | None]]) -> dict:
        """Summary for ``meta["completeness"]``; warns (CompletenessWarning) when skipped or an image fails."""
        if not self.enabled:
            warnings.warn(f"FAIG completeness check (Eq. 4) skipped: {self.skip_reason}; the scores are not "
                          "checked against the loss change", CompletenessWarning, stacklevel=5)
            return {"checked": 0, "skipped": self.skip_reason}
        checked = [(n, c) for _, n, c in items if c is not None]
        verdicts = [judge(c, self.precision) for _, c in checked]
        bad = [i for i, v in enumerate(verdicts) if v.flagged]
        out = {"checked": len(checked), "every": self.every, "rule": f"{self.method}/{self.steps}",
               "images": [n for n, _ in checked], "delta": [relative_delta(c) for _, c in checked],
               "error": [v.residual / v.scale for v in verdicts],
               "tolerance": [v.allowed / v.scale for v in verdicts],
               "buffers_move": self.buffers_move,
               "buffer_share": [_share(c) for _, c in checked], "flagged": len(bad)}
        if bad:
            self._warn_failed(checked, verdicts, bad)
        return out

    def _warn_failed(self, checked: list, verdicts: list[Verdict], bad: list[int]) -> None:
        worst = max(bad, key=lambda i: verdicts[i].residual / max(verdicts[i].allowed, 1e-300))
        name, check = checked[worst]
        v = verdicts[worst]
        total, diff = check[0] + check[1], check[3] - check[2]
        warnings.warn(
            f"FAIG completeness check (Eq. 4) failed on {len(bad)} of {len(checked)} checked images: on "
            f"'{name}' Σ FAIG = {total:.6g} but L(θ̄) − L(θ) = {diff:.6g} (error {v.residual / v.scale:.3g} of "
            f"the loss change after the rule's own estimated error; the {self.method} rule with {self.steps} "
            f"steps explains ≤ {v.allowed / v.scale:.3g} on this image). The model's gradient may not be the "
            "derivative of its output (detached or straight-through branches, custom backward), the model may "
            "change between forward passes (edits its input or weights in place, counts calls, draws random "
            "numbers), or the pair is too far apart for this rule (try more steps or method='gausslegendre'): "
            "the scores may be wrong.", CompletenessWarning, stacklevel=5)


def _share(check: HostCheck) -> float:
    """The floating buffers' share of Σ."""
    total = check[0] + check[1]
    return check[1] / total if total else 0.0


@contextlib.contextmanager
def warm_up_calls() -> Iterator[None]:
    """Silences the "check skipped" warning of calls made only to warm caches up (their results are
    thrown away), so that it is said out loud only for results someone reads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"FAIG completeness check \(Eq. 4\) skipped", category=CompletenessWarning)
        yield
