"""The completeness guard of Eq. 4 (faig_fast.core.completeness): quiet on valid runs (the zoo, both
shipped tiny pairs, fp32 and bf16, Riemann-100 and Gauss–Legendre 8), loud on a model whose gradient is
not the derivative of its output, the floating buffers' share for BatchNorm pairs, its cost, and one
warning whenever it is skipped."""
from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import faig_fast
from conftest import TinySR, make_loader, make_pair, perturb_
from faig_fast import attribute
from faig_fast.core.completeness import (CompletenessGuard, checks_to_host, error_model, image_check, judge,
                                         relative_delta)
from faig_fast.core.engine import PathEngine
from faig_fast.core.quadrature import nodes_and_weights
from faig_fast.data.degradations import make_degradation
from faig_fast.data.images import demo_images
from faig_fast.errors import CompletenessWarning
from faig_fast.models import load_model
from test_zoo import ZOO, BatchNormNet, zoo_images, zoo_pair

PAIRS = Path(faig_fast.__file__).parent / "assets" / "pairs"
RULES = [("gausslegendre", 8), ("riemann_left", 100)]


def _perturbed_pair(cls, seed: int = 0, noise: float = 0.05, **kw):
    torch.manual_seed(seed)
    a = cls(**kw).double().eval()
    b = copy.deepcopy(a)
    perturb_(b, noise, torch.Generator().manual_seed(seed + 1))
    return a, b


class HalfDetached(nn.Module):
    """×2 SR whose body branch passes half its gradient (``b = 0.5*b + 0.5*b.detach()``, as models with
    detached branches do): its output is unchanged, its gradient is not the output's derivative."""

    def __init__(self, detach: bool = True, feat: int = 8):
        super().__init__()
        self.detach = detach
        self.head = nn.Conv2d(3, feat, 3, padding=1)
        self.body = nn.Conv2d(feat, feat, 3, padding=1)
        self.tail = nn.Conv2d(feat, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.upscale = 2

    def forward(self, x):
        b = self.body(F.leaky_relu(self.head(x), 0.1))
        if self.detach:
            b = 0.5 * b + 0.5 * b.detach()
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return self.shuffle(self.tail(F.leaky_relu(b, 0.1))) + up


_PHOTOS: list[torch.Tensor] = []


def degraded(n: int = 1, size: int = 16, scale: int = 2, labels=("blur", "noise")):
    """(lq, gt, name) of ``n`` photo crops (GT ``size`` px) per degradation label, float64."""
    if not _PHOTOS:
        _PHOTOS.extend(t for _, t in demo_images(("astronaut", "chelsea", "coffee", "rocket"), max_side=64))
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        img = _PHOTOS[i % len(_PHOTOS)]
        y0, x0 = (7 * i) % (img.shape[1] - size), (11 * i) % (img.shape[2] - size)
        gt = img[:, y0:y0 + size, x0:x0 + size].double()
        out += [(make_degradation(lab, scale=scale)(gt, g).double(), gt, f"img{i}/{lab}") for lab in labels]
    return out


def guard_run(a, b, data, method, steps, precision="fp32", mode="eval", enabled=True, every_image=True):
    """The run loop's use of the guard: integrate, check on the device, one transfer, report."""
    engine = PathEngine(a, b, precision=precision, mode=mode)
    guard = CompletenessGuard(method, steps, precision, enabled, every_image, engine.buffers_move)
    names, checks = [], []
    with engine.runner.math_mode():
        for i, (lq, gt, name) in enumerate(data):
            x, y = lq[None], gt[None]
            img = engine.integrate(x, y, method, steps)[0]
            names.append(name)
            checks.append(image_check(engine, img, x, y, method, steps) if guard.wants(i) else None)
    host = checks_to_host(checks)
    return guard.report([(i, n, c) for i, (n, c) in enumerate(zip(names, host))]), host


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompletenessWarning)
        return fn(*args, **kw)


# the rule's own error ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
                                    "gausslegendre"])
@pytest.mark.parametrize("steps", [8, 9])
def test_error_model_explains_smooth_integrands(method, steps):
    """On a smooth f the estimated error is the rule's error: exact for linear f on an even number of
    nodes, else within 30 % (Gauss–Legendre is exact for both and its roughness is zero)."""
    model = error_model(method, steps)
    alphas = nodes_and_weights(method, steps)[0]
    for power, integral in ((1, 0.5), (2, 1 / 3)):
        f = alphas ** power
        err = float((model.weights * f).sum()) - integral
        est = float(model.correction @ f)
        exact = power == 1 and steps % 2 == 0
        assert abs(err - est) <= (1e-12 if exact else 0.3 * abs(err) + 1e-12), (power, err, est)
        rough = float(torch.linalg.vector_norm(model.roughness @ f))
        assert rough < (1e-12 if power == 1 or method == "gausslegendre" else 0.02)


# valid runs never warn --------------------------------------------------------------------------

VALID_ZOO = [n for n in ZOO if n != "reads_data"]  # reads .data: its gradient is not the derivative


@pytest.mark.filterwarnings("ignore:.*zero gradient", "ignore:.*falls back")
@pytest.mark.parametrize("name", VALID_ZOO)
def test_quiet_on_the_zoo(name):
    a, b = zoo_pair(name)
    lq, gt = zoo_images(name, n=1, size=12)
    for precision in ("fp32", "bf16"):
        for method, steps in RULES:
            report, _ = quiet(guard_run, a, b, [(lq[0], gt[0], name)], method, steps, precision)
            assert report["checked"] == 1 and report["flagged"] == 0


@pytest.mark.parametrize("pair", ["msrresnet_tiny", "srcnn_style_tiny"])
def test_quiet_on_the_shipped_pairs(pair):
    a = load_model(PAIRS / pair / "baseline.safetensors")
    b = load_model(PAIRS / pair / "target.safetensors")
    data = degraded(n=1, size=16)
    for precision in ("fp32", "bf16"):
        for method, steps in RULES:
            report, _ = quiet(guard_run, a, b, data, method, steps, precision)
            assert report["checked"] == 2 and report["flagged"] == 0
            assert max(report["error"]) < max(report["tolerance"])


# a gradient that is not the derivative warns on every image class --------------------------------

@pytest.mark.parametrize("method, steps", RULES)
@pytest.mark.parametrize("precision, seed", [("fp32", 0), ("bf16", 1)])
def test_half_detached_branch_warns_on_every_image_class(method, steps, precision, seed):
    data = degraded(n=1)
    a, b = _perturbed_pair(HalfDetached, seed=seed, detach=True)
    with pytest.warns(CompletenessWarning, match=r"failed on 2 of 2 checked images.*detached"):
        report, host = guard_run(a, b, data, method, steps, precision)
    assert report["flagged"] == 2
    assert min(relative_delta(c) for c in host) > 0.05
    twin_a, twin_b = _perturbed_pair(HalfDetached, seed=seed, detach=False)
    report, host = quiet(guard_run, twin_a, twin_b, data, method, steps, precision)
    assert report["flagged"] == 0 and max(relative_delta(c) for c in host) < 0.03


# floating buffers (BatchNorm running statistics) -------------------------------------------------

def test_batchnorm_buffers_share_makes_eq4_hold():
    """Running statistics that differ move along the path: with their share, Σ = ΔL and the check runs;
    without it the parameters alone miss a large part of ΔL."""
    a, b = zoo_pair("batchnorm")
    data = [(x, y, f"img{i}") for i, (x, y) in enumerate(zip(*zoo_images("batchnorm", n=2, size=8)))]
    report, host = quiet(guard_run, a, b, data, "riemann_left", 100)
    assert report["buffers_move"] and report["checked"] == 2 and report["flagged"] == 0
    assert all(relative_delta(c) < 0.01 for c in host)
    params_only = [abs(c[0] - (c[3] - c[2])) / abs(c[3] - c[2]) for c in host]
    assert min(params_only) > 0.1 and min(abs(s) for s in report["buffer_share"]) > 0.1
    json.dumps(report)


def test_batchnorm_in_train_mode_has_no_buffer_share():
    a, b = zoo_pair("batchnorm")
    lq, gt = zoo_images("batchnorm", n=1, size=8)
    report, host = quiet(guard_run, a, b, [(lq[0], gt[0], "x")], "gausslegendre", 8, mode="train")
    assert report["checked"] == 1 and report["flagged"] == 0
    assert abs(host[0][1]) < 1e-9 * abs(host[0][0])


@pytest.mark.parametrize("buffers_move, steps", [(False, 8), (False, 100), (True, 8), (True, 100)])
def test_sampling_keeps_the_check_under_five_percent(buffers_move, steps):
    guard = CompletenessGuard("riemann_left", steps, "fp32", True, False, buffers_move)
    forwards = 2 + (2 * steps if buffers_move else 0)
    assert forwards / guard.every <= 0.05 * 2 * steps
    if guard.every > 1:  # the densest sampling within the budget
        assert forwards / (guard.every - 1) > 0.05 * 2 * steps


def test_buffer_check_forwards_are_counted():
    """Counted forward calls of a BatchNorm pair: the check adds 2 + 2·steps per checked image."""
    a, b = zoo_pair("batchnorm")
    lq, gt = zoo_images("batchnorm", n=1, size=8)
    engine = PathEngine(a, b)
    calls = []
    engine.net.register_forward_pre_hook(lambda m, x: calls.append(1))
    img = engine.integrate(lq, gt, "gausslegendre", 8)[0]
    calls.clear()
    image_check(engine, img, lq, gt, "gausslegendre", 8)
    assert len(calls) == 2 + 2 * 8


# skipped checks warn once -----------------------------------------------------------------------

def test_skipped_checks_warn_once():
    a, b = make_pair()
    data = degraded(n=1)
    with pytest.warns(CompletenessWarning, match=r"check \(Eq. 4\) skipped: check_completeness=False") as rec:
        report, _ = guard_run(a, b, data, "gausslegendre", 8, enabled=False)
    assert report == {"checked": 0, "skipped": "check_completeness=False"} and len(rec) == 1
    with pytest.warns(CompletenessWarning, match=r"skipped: the riemann_left rule with 2 steps is too coarse"):
        guard_run(a, b, data, "riemann_left", 2)


def test_non_finite_check_is_flagged():
    guard = CompletenessGuard("gausslegendre", 8, "fp32", True, True, False)
    with pytest.warns(CompletenessWarning, match="failed on 1 of 2"):
        report = guard.report([(0, "ok", (1.0, 0.0, 1.0, 2.0, 0.0, 0.01, 1.0)),
                               (1, "nan", (math.nan, 0.0, 1.0, 2.0, 0.0, 0.01, 1.0))])
    assert report["flagged"] == 1


def test_unrelated_integral_always_trips():
    """However rough f is, the rule never explains more than half the path's scale."""
    v = judge((1.0, 0.0, 0.0, -1.0, 0.0, 100.0, 1.0), "fp32")  # Σ = 1 but ΔL = −1
    assert v.flagged and v.allowed == 0.5


# through faig_fast.attribute (the run loop) -------------------------------------------------------

class CompoundingInput(nn.Module):
    """TinySR whose input is scaled by 2 on every call: what an engine that handed one tensor to every
    pass of a model doing ``x.mul_(2)`` in forward would compute (the hidden state lives in ``calls``)."""

    def __init__(self):
        super().__init__()
        self.sr = TinySR()
        self.upscale = 2
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.sr(x * 2.0 ** self.calls)


@pytest.mark.parametrize("steps", [8, 16])
@pytest.mark.parametrize("method", ["riemann_left", "gausslegendre"])
def test_completeness_guard_quiet_on_a_normal_pair(steps, method):
    a, b = make_pair()
    res = quiet(attribute, a, b, make_loader(("blur", "noise", "blur", "noise")), steps=steps, method=method)
    report = res.meta["completeness"]
    every = math.ceil(20 / steps)
    assert report["every"] == every and report["flagged"] == 0
    assert report["images"] == [f"image{i}" for i in range(0, 4, every)]
    assert len(report["delta"]) == report["checked"] == len(range(0, 4, every))
    assert all(e < t / 2 for e, t in zip(report["error"], report["tolerance"]))


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("steps", [8, 16])
def test_completeness_guard_trips_on_a_model_that_changes_between_passes(strategy, steps):
    a, b = _perturbed_pair(CompoundingInput)
    with pytest.warns(CompletenessWarning, match="failed on 1 of 1 checked images: on 'image0'"):
        res = attribute(a, b, make_loader(("blur",)), steps=steps, strategy=strategy)
    assert res.meta["completeness"]["flagged"] == 1 and res.meta["completeness"]["error"][0] > 0.5


def test_completeness_guard_costs_at_most_five_percent():
    """Counted forward calls: the check adds 2 per checked image, ≤ 5 % of 2·steps per image (+ the first)."""
    a, b = make_pair()
    calls = []
    b.register_forward_pre_hook(lambda m, x: calls.append(1))
    data = make_loader(("blur", "noise") * 6)
    counts = {}
    for on in (False, True):
        calls.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CompletenessWarning)  # the skipped check warns
            res = attribute(a, b, data, steps=8, strategy="loop", check_completeness=on)
        counts[on] = len(calls)
    checked = res.meta["completeness"]["checked"]
    assert checked == 4  # images 0, 3, 6, 9
    assert counts[True] - counts[False] == 2 * checked
    assert 2 * checked <= 0.05 * (2 * 8 * 12)


def test_completeness_guard_skips_what_it_cannot_check():
    a, b = make_pair()
    with pytest.warns(CompletenessWarning, match="skipped: check_completeness=False"):
        res = attribute(a, b, make_loader(), steps=8, check_completeness=False)
    assert res.meta["completeness"] == {"checked": 0, "skipped": "check_completeness=False"}
    with pytest.warns(CompletenessWarning, match="too coarse"):
        res = attribute(a, b, make_loader(), steps=2)
    assert "too coarse" in res.meta["completeness"]["skipped"]
    res = quiet(attribute, a, b, make_loader(), steps=8, return_convergence_delta=True)
    assert len(res.convergence_delta) == 3 and res.meta["completeness"]["delta"] == res.convergence_delta


def test_attribute_checks_batchnorm_pairs():
    """A fine-tuned BatchNorm pair (running statistics differ) is checked, not skipped."""
    a, b = _perturbed_pair(BatchNormNet)
    lq, gt = zoo_images("batchnorm", n=2, size=8)
    res = quiet(attribute, a, b, [(lq[i], gt[i], "blur") for i in range(2)], return_convergence_delta=True)
    report = res.meta["completeness"]
    assert report["checked"] == 2 and report["flagged"] == 0 and report["buffers_move"]
    assert max(res.convergence_delta) < 0.01 and min(abs(s) for s in report["buffer_share"]) > 0.05
