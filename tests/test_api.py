"""faig_fast.attribute against the reference loop, the index convention, persistence and bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import faig_fast
from conftest import make_images, make_loader, make_pair
from faig_fast import attribute
from faig_fast.core.attribution import Attribution, jaccard, read_index_file, top_count, write_index_file
from faig_fast.errors import FAIGError, InvalidInputError, ModelMismatchError
from faig_fast.core.filters import FilterIndex
from faig_fast.core.reference import reference_attribute


@pytest.mark.parametrize("strategy", ["loop", "vmap", "linear", "tune"])
@pytest.mark.parametrize("method", ["riemann_left", "gausslegendre"])
def test_attribute_equals_reference(strategy, method):
    a, b = make_pair()
    data = make_loader(("blur", "noise", "blur+noise", "noise"))
    ref = reference_attribute(a, b, data, steps=6, method=method, keep_per_image=True)
    got = attribute(a, b, data, steps=6, method=method, strategy=strategy, precision="fp64",
                    keep_per_image=True, internal_batch_size=4)
    assert got.counts == ref.counts
    for label in ref.labels:
        torch.testing.assert_close(got.scores(label), ref.scores(label), rtol=1e-9, atol=1e-12)
        assert torch.equal(got.ranking(label), ref.ranking(label))
    for x, y in zip(got.image_scores, ref.image_scores):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_device_accumulation_equals_per_image_sums(dtype, backend, monkeypatch):
    """Without keep_per_image the fused reduce-and-accumulate kernel sums each degradation on the device."""
    from faig_fast.core import api

    calls = []
    fused = api.filter_abs_sum_accumulate
    monkeypatch.setattr(api, "filter_abs_sum_accumulate", lambda *a, **k: calls.append(1) or fused(*a, **k))
    a, b = make_pair(dtype=dtype)
    lq, gt = make_images(4, dtype=dtype)
    batched = [(lq[:3], gt[:3], ["noise", "blur", "noise"]), (lq[3], gt[3], "clean")]
    kw = dict(steps=3, strategy="vmap", backend=backend, precision="fp64" if dtype == torch.float64 else "fp32")
    host = attribute(a, b, batched, keep_per_image=True, **kw)
    assert not calls
    dev = attribute(a, b, batched, **kw)
    assert calls and dev.counts == host.counts == {"noise": 2, "blur": 1, "clean": 1}
    assert dev.image_labels == host.image_labels
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-9)
    for label in host.labels:
        torch.testing.assert_close(dev.sums[label], host.sums[label], **tol)
        assert dev.sums[label].dtype == torch.float64 and dev.sums[label].device.type == "cpu"


def test_vmap_batches_images_of_equal_size():
    a, b = make_pair()
    lq, gt = make_images(3)
    batched = [(lq, gt, ["blur", "noise", "blur"])]
    single = make_loader(("blur", "noise", "blur"))
    x = attribute(a, b, batched, steps=4, strategy="vmap", precision="fp64", keep_per_image=True)
    y = reference_attribute(a, b, single, steps=4, keep_per_image=True)
    for s, t in zip(x.image_scores, y.image_scores):
        torch.testing.assert_close(s, t, rtol=1e-9, atol=1e-12)


def test_fp32_engine_matches_fp64_reference():
    a, b = make_pair()
    data = make_loader()
    ref = reference_attribute(a, b, data, steps=8)
    got = attribute(a.float(), b.float(), [(x.float(), y.float(), l) for x, y, l in data], steps=8)
    torch.testing.assert_close(got.scores("blur"), ref.scores("blur"), rtol=1e-4, atol=1e-6)


def test_convergence_delta_reported():
    a, b = make_pair(noise=0.2)
    data = make_loader(("blur",))
    coarse = attribute(a, b, data, steps=4, precision="fp64", return_convergence_delta=True)
    fine = attribute(a, b, data, steps=8, method="gausslegendre", precision="fp64", return_convergence_delta=True)
    assert len(coarse.convergence_delta) == 1
    # measured on this pair: left Riemann N=4 ≈ 1e-1, Gauss–Legendre 8 nodes ≈ 8e-5 (LeakyReLU kinks)
    assert fine.convergence_delta[0] < 1e-3 < coarse.convergence_delta[0]


def test_dict_batches_and_label_sequences():
    a, b = make_pair()
    lq, gt = make_images(2)
    res = attribute(a, b, [{"lq": lq, "gt": gt, "label": ("blur", "noise"), "name": ["x", "y"]}], steps=2)
    assert res.counts == {"blur": 1, "noise": 1}
    assert res.image_names == ["x", "y"]


def test_index_convention_matches_state_dict_row_major():
    a, b = make_pair(feat=4)
    index = FilterIndex.from_model(b)
    assert [l.name for l in index.layers] == ["head.weight", "mid.weight", "tail.weight"]
    assert len(index) == 4 * 3 + 4 * 4 + 12 * 4
    info = index.lookup(12 + 2 * 4 + 1)
    assert (info.layer, info.out_channel, info.in_channel) == ("mid.weight", 2, 1)
    flat = list(index)
    assert [f.index for f in flat] == list(range(len(index)))
    assert flat[5] == ("head.weight", 1, 2, 5)
    with pytest.raises(InvalidInputError):
        index.lookup(len(index))


def test_top_and_ranking():
    a, b = make_pair()
    res = attribute(a, b, make_loader(), steps=3)
    n = len(res.index)
    assert top_count(n, 0.01) == 1
    top = res.top("blur", 0.1)
    assert len(top) == math.floor(0.1 * n)
    s = res.scores("blur")
    assert torch.all(s[top].min() >= s[res.ranking("blur")[len(top):]])


def test_save_load_round_trip(tmp_path):
    a, b = make_pair()
    res = attribute(a, b, make_loader(), steps=3, keep_per_image=True, return_convergence_delta=True)
    path = res.save(tmp_path / "attr.safetensors")
    back = Attribution.load(path)
    assert back.counts == res.counts and back.index == res.index
    assert back.image_names == res.image_names and back.convergence_delta == res.convergence_delta
    for l in res.labels:
        assert torch.equal(back.scores(l), res.scores(l))
    assert back.meta["model_a_sha256"] == res.meta["model_a_sha256"]
    assert back.meta["version"] == faig_fast.__version__
    assert all(torch.equal(x, y) for x, y in zip(back.image_scores, res.image_scores))


def test_index_file_round_trip(tmp_path):
    write_index_file(torch.tensor([5, 2, 9]), tmp_path / "idx.txt")
    assert read_index_file(tmp_path / "idx.txt").tolist() == [5, 2, 9]
    (tmp_path / "bad.txt").write_text("1 2 x")
    with pytest.raises(InvalidInputError, match="bad.txt"):
        read_index_file(tmp_path / "bad.txt")
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5


# bad input --------------------------------------------------------------------------------------

def test_mismatched_architectures():
    a, _ = make_pair(feat=4)
    _, b = make_pair(feat=5)
    with pytest.raises(ModelMismatchError, match="head.weight"):
        attribute(a, b, make_loader(), steps=2)
    with pytest.raises(ModelMismatchError, match="TinySR"):
        attribute(a, nn.Sequential(nn.Conv2d(3, 3, 3)), make_loader(), steps=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights(bad):
    a, b = make_pair()
    with torch.no_grad():
        b.mid.weight[0, 0, 0, 0] = bad
    with pytest.raises(InvalidInputError, match="mid.weight"):
        attribute(a, b, make_loader(), steps=2)


def test_empty_loader(pair):
    with pytest.raises(InvalidInputError, match="no images"):
        attribute(*pair, [], steps=2)


def test_wrong_scale(pair):
    lq, gt = make_images(1)
    with pytest.raises(InvalidInputError, match="scale 2"):
        attribute(*pair, [(lq, gt[..., :-2, :], "blur")], steps=2)


@pytest.mark.parametrize("mutate, match", [
    (lambda lq: lq * 3, r"\[0, 1\]"),
    (lambda lq: lq.masked_fill(lq > 0.5, float("nan")), "NaN"),
    (lambda lq: lq[:, :1], "3 \\(RGB\\) channels"),
    (lambda lq: (lq * 255).to(torch.uint8), "float"),
    (lambda lq: lq.numpy(), "torch.Tensor"),
])
def test_bad_images(pair, mutate, match):
    lq, gt = make_images(1)
    with pytest.raises(InvalidInputError, match=match):
        attribute(*pair, [(mutate(lq), gt, "blur")], steps=2)


def test_bad_labels(pair):
    lq, gt = make_images(2)
    with pytest.raises(InvalidInputError, match="labels"):
        attribute(*pair, [(lq, gt, ["blur"])], steps=2)
    with pytest.raises(InvalidInputError, match="label"):
        attribute(*pair, [(lq, gt, 3)], steps=2)


def test_unknown_label_in_scores(pair):
    res = attribute(*pair, make_loader(), steps=2)
    with pytest.raises(InvalidInputError, match="unknown degradation label 'jpeg'"):
        res.scores("jpeg")


def test_bad_quadrature(pair):
    with pytest.raises(InvalidInputError, match="quadrature"):
        attribute(*pair, make_loader(), method="simpson")
    with pytest.raises(InvalidInputError, match="steps"):
        attribute(*pair, make_loader(), steps=0)


def test_errors_share_one_base():
    assert issubclass(InvalidInputError, FAIGError) and issubclass(ModelMismatchError, FAIGError)


def test_model_without_convs():
    a, b = nn.Sequential(nn.Linear(3, 3)), nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(InvalidInputError, match="no convolution"):
        attribute(a, b, make_loader(), steps=2)


def test_tune_keeps_the_fastest_measured_strategy():
    a, b = make_pair()
    res = attribute(a, b, make_loader(("blur",)), steps=3, strategy="tune")
    assert res.meta["strategy"] in ("loop", "vmap", "linear")


def test_fused_triton_epilogue_matches_torch(monkeypatch):
    """The linear-path conv with the Triton epilogue (interpreted on CPU) equals the PyTorch combine."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from faig_fast.core.engine import linear_path_conv

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.rand(5, 3, 6, 6)
    alphas = torch.linspace(0, 1, 5)
    dw, db = torch.randn_like(conv.weight), torch.randn_like(conv.bias)
    w = conv.weight.detach().clone().requires_grad_()
    b = conv.bias.detach().clone().requires_grad_()
    outs, grads = [], []
    for fused in (False, True):
        y = linear_path_conv(x, w, dw, b, db, alphas, conv, fused=fused)
        gw, gb = torch.autograd.grad((y ** 2).sum(), (w, b))
        outs.append(y.detach())
        grads.append((gw, gb))
    torch.testing.assert_close(outs[0], outs[1])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-5)
