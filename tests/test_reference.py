"""The reference loop against an independent finite-difference computation, and Eq. 4."""
from __future__ import annotations

import pytest
import torch

from conftest import make_images, make_loader, make_pair
from test_zoo import assert_identical, snapshot, zoo_images, zoo_pair
from faig_fast.core.filters import FilterIndex
from faig_fast.core.quadrature import nodes_and_weights
from faig_fast.core.reference import filter_scores, reference_attribute, reference_image_faig, sse
from faig_fast.errors import InvalidInputError


def finite_difference_faig(model_a, model_b, lq, gt, steps):
    """FAIG by central differences of L along each coordinate: independent of autograd.

    Floating buffers move along the path too (without a gradient); integer buffers stay model_b's.
    """
    names = [n for n, _ in model_b.named_parameters()]
    theta = {n: p.detach().clone() for n, p in model_b.named_parameters()}
    delta = {n: dict(model_a.named_parameters())[n].detach() - theta[n] for n in names}
    bufs = {n: b.detach().clone() for n, b in model_b.named_buffers() if b.is_floating_point()}
    buf_delta = {n: dict(model_a.named_buffers())[n].detach() - bufs[n] for n in bufs}
    net = TinyFunctional(model_b)
    alphas, weights = nodes_and_weights("riemann_left", steps)
    out = {n: torch.zeros_like(theta[n]) for n in names}
    eps = 1e-6
    for a, w in zip(alphas.tolist(), weights.tolist()):
        point = {n: theta[n] + a * delta[n] for n in names}
        point.update({n: bufs[n] + a * buf_delta[n] for n in bufs})
        for n in names:
            flat = point[n].view(-1)
            g = out[n].view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + eps
                lp = float(sse(net(point, lq), gt))
                flat[i] = old - eps
                lm = float(sse(net(point, lq), gt))
                flat[i] = old
                g[i] += w * (lp - lm) / (2 * eps)
    return {n: delta[n] * out[n] for n in names}


class TinyFunctional:
    def __init__(self, model):
        self.model = model

    def __call__(self, params, x):
        return torch.func.functional_call(self.model, params, (x[None].clone(),))


def test_reference_matches_finite_differences():
    a, b = make_pair(feat=2)
    lq, gt = make_images(1, size=4)
    ref = reference_image_faig(a, b, lq[0], gt[0], steps=3)
    fd = finite_difference_faig(a, b, lq[0], gt[0], steps=3)
    for n in ref:
        torch.testing.assert_close(ref[n], fd[n], rtol=1e-6, atol=1e-8)


def test_completeness_improves_with_steps():
    """Σ_i FAIG_i over all parameters → L(θ̄) − L(θ) (Eq. 4); the left-Riemann error shrinks ~1/N."""
    a, b = make_pair(feat=4, noise=0.2)
    lq, gt = make_images(1, size=6)
    with torch.no_grad():
        diff = float(sse(a(lq), gt) - sse(b(lq), gt))
    errors = []
    for steps in (5, 50, 500):
        faig = reference_image_faig(a, b, lq[0], gt[0], steps=steps)
        total = sum(float(v.sum()) for v in faig.values())
        errors.append(abs(total - diff) / abs(diff))
    assert errors[0] > errors[1] > errors[2]
    # measured: ~1/N convergence; N=500 gives well under 1% relative error on this pair
    assert errors[2] < 0.01
    assert errors[1] < errors[0] / 5


def test_filter_scores_sum_abs_per_filter():
    a, b = make_pair()
    lq, gt = make_images(1)
    faig = reference_image_faig(a, b, lq[0], gt[0], steps=4)
    index = FilterIndex.from_model(b)
    s = filter_scores(faig, index)
    assert s.shape == (len(index),)
    w = faig["head.weight"]
    assert torch.allclose(s[1 * 3 + 2], w[1, 2].abs().sum())
    last = index.layers[-1]
    assert torch.allclose(s[last.start + 5 * last.shape[1] + 3], faig["tail.weight"][5, 3].abs().sum())


def test_reference_attribute_eq7(pair):
    a, b = pair
    data = make_loader(("blur", "noise", "blur"))
    res = reference_attribute(a, b, data, steps=4, keep_per_image=True)
    assert res.counts == {"blur": 2, "noise": 1}
    s = res.image_scores
    expected = (s[0].double() + s[2].double()) / 2 - s[1].double()
    torch.testing.assert_close(res.scores("blur"), expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", ["batchnorm", "nonpersistent_buffers", "inplace_input", "tied"])
def test_reference_matches_finite_differences_on_buffers_ties_and_inplace_input(name):
    """Floating buffers (persistent or not) move with the path, integer ones stay, a tied weight counts
    once, and an input scaled in place never compounds: checked against autograd-free differences."""
    a, b = zoo_pair(name, noise=0.1)
    lq, gt = zoo_images(name, n=1)
    ref = reference_image_faig(a, b, lq[0], gt[0], steps=2)
    fd = finite_difference_faig(a, b, lq[0], gt[0], steps=2)
    assert list(ref) == list(fd)
    for n in ref:
        torch.testing.assert_close(ref[n], fd[n], rtol=1e-5, atol=1e-7)


def test_reference_modes_filters_and_untouched_models():
    a, b = zoo_pair("batchnorm")
    lq, gt = zoo_images("batchnorm", n=1)
    before = snapshot(a, b, lq, gt)
    train = reference_image_faig(a, b, lq[0], gt[0], steps=2, mode="train")
    evals = reference_image_faig(a, b, lq[0], gt[0], steps=2)
    assert not torch.allclose(train["head.weight"], evals["head.weight"])
    assert_identical(before, snapshot(a, b, lq, gt))
    with pytest.raises(InvalidInputError, match="mode"):
        reference_image_faig(a, b, lq[0], gt[0], steps=2, mode="test")

    a, b = zoo_pair("window_attention")
    lq, gt = zoo_images("window_attention")
    data = [(lq[i], gt[i], "noise") for i in range(2)]
    res = reference_attribute(a, b, data, steps=2, keep_per_image=True, filters="conv+linear")
    kinds = [l.kind for l in res.index.layers]
    assert "linear" in kinds and "conv" in kinds
    for i, scores in enumerate(res.image_scores):
        expected = filter_scores(reference_image_faig(a, b, lq[i], gt[i], steps=2), res.index)
        torch.testing.assert_close(scores, expected, rtol=0, atol=0)
