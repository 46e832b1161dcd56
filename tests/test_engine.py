"""PathEngine beyond the zoo: tune, device and step limits, modes, clear errors, the persample engine's
chunking and CUDA-graph fallback, and the pair checks on buffers."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_images, make_pair
from faig_fast.core.engine import PathEngine
from faig_fast.core.pair import check_pair
from faig_fast.core.quadrature import nodes_and_weights
from faig_fast.core.reference import reference_image_faig, sse
from faig_fast.errors import FAIGError, InvalidInputError, ModelMismatchError
from test_zoo import BatchNormNet, zoo_images, zoo_pair


def assert_equal_grads(got, expected, engine=None):
    for g, ref in zip(got, expected):
        for n in ref:
            value = engine.delta[n] * g.grads[n] if engine is not None else g.grads[n]
            torch.testing.assert_close(value, ref[n], rtol=1e-9, atol=1e-13)


# tune ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fast", ["persample", "loop"])
def test_tune_keeps_the_argmin_of_its_timings(fast, monkeypatch):
    a, b = make_pair()
    lq, gt = make_images(2)
    engine = PathEngine(a, b, strategy="tune", precision="fp64")
    real = engine._integrate_batch

    def timed(*args):
        if engine.strategy != fast:
            time.sleep(0.02)
        return real(*args)

    monkeypatch.setattr(engine, "_integrate_batch", timed)
    got = engine.integrate(lq, gt, steps=3)
    assert set(engine.tuning) == set(engine.candidates()) == {"linear", "persample", "vmap", "loop"}
    assert engine.strategy == fast == min(engine.tuning, key=engine.tuning.get)
    assert all(engine.tuning[fast] < t for s, t in engine.tuning.items() if s != fast)
    expected = PathEngine(a, b, strategy="loop", precision="fp64").integrate(lq, gt, steps=3)
    assert_equal_grads(got, [e.grads for e in expected])


def test_tune_with_every_candidate_out_of_memory_is_a_clear_error(monkeypatch):
    a, b = make_pair()
    lq, gt = make_images(1)
    engine = PathEngine(a, b, strategy="tune", precision="fp64")

    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    for name in ("_loop", "_vmap_chunk", "_linear_chunk", "_persample_chunk"):
        monkeypatch.setattr(engine, name, oom)
    with pytest.raises(FAIGError, match="every candidate failed") as info:
        engine.integrate(lq, gt, steps=3)
    for s in ("linear", "persample", "vmap", "loop"):
        assert f"{s}: out of memory" in str(info.value)
    assert engine.tuning == {}


# devices, steps, modes ----------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    a, b = make_pair()
    with pytest.raises(InvalidInputError, match=r"CUDA is not available.*device='cpu'"):
        PathEngine(a, b, device="cuda")


def test_unknown_device_is_named():
    a, b = make_pair()
    with pytest.raises(InvalidInputError, match="unknown device 'gpu0'"):
        PathEngine(a, b, device="gpu0")


def test_absurd_step_counts_are_refused_before_allocating():
    t0 = time.perf_counter()
    with pytest.raises(InvalidInputError, match="gausslegendre: use 1 to 256"):
        nodes_and_weights("gausslegendre", 10**9)
    with pytest.raises(InvalidInputError, match="riemann_left: use 1 to 100000"):
        nodes_and_weights("riemann_left", 10**6)
    assert time.perf_counter() - t0 < 1.0
    a, w = nodes_and_weights("gausslegendre", 256)
    assert len(a) == 256 and abs(float(w.sum()) - 1) < 1e-12
    assert len(nodes_and_weights("riemann_left", 100_000)[0]) == 100_000


def test_unknown_mode():
    a, b = make_pair()
    with pytest.raises(InvalidInputError, match="mode"):
        PathEngine(a, b, mode="inference")


@pytest.mark.parametrize("strategy", ["loop", "vmap", "persample"])
def test_train_mode_batchnorm_equals_reference(strategy):
    """mode='train': BatchNorm uses each image's own statistics in every strategy, as in the reference."""
    a, b = zoo_pair("batchnorm")
    lq, gt = zoo_images("batchnorm")
    ref = [reference_image_faig(a, b, lq[i], gt[i], steps=3, mode="train") for i in range(2)]
    ref_eval = reference_image_faig(a, b, lq[0], gt[0], steps=3)
    assert not torch.allclose(ref[0]["head.weight"], ref_eval["head.weight"])
    engine = PathEngine(a, b, strategy=strategy, precision="fp64", mode="train", chunk_size=2)
    assert_equal_grads(engine.integrate(lq, gt, steps=3), ref, engine)
    assert not b.training and int(b.bn.num_batches_tracked) == 0
    as_is = PathEngine(a, b.train(), strategy=strategy, precision="fp64", mode="as-is")
    assert_equal_grads(as_is.integrate(lq, gt, steps=3), ref, as_is)


def test_endpoint_losses_move_buffers_too():
    a, b = zoo_pair("batchnorm")
    lq, gt = zoo_images("batchnorm", n=1)
    engine = PathEngine(a, b, strategy="persample", precision="fp64")
    img = engine.integrate(lq, gt, steps=2, endpoints=True)[0]
    with torch.no_grad():
        assert img.loss_target == pytest.approx(float(sse(b(lq), gt)), rel=1e-12)
        assert img.loss_baseline == pytest.approx(float(sse(a(lq), gt)), rel=1e-12)
    assert engine.buffers_move and "bn.running_mean" in engine.buffer_delta


# clear errors -------------------------------------------------------------------------------------

class SigmoidThenInPlace(nn.Module):
    """Sigmoid saves its output for backward; an inplace ReLU then overwrites it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid(), nn.ReLU(inplace=True))
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.tail(self.body(x))


@pytest.mark.parametrize("strategy", ["loop", "vmap", "persample"])
def test_forward_autograd_cannot_differentiate_names_the_module(strategy):
    torch.manual_seed(0)
    a, b = SigmoidThenInPlace().double(), SigmoidThenInPlace().double()
    lq, gt = zoo_images("prelu", n=1)
    engine = PathEngine(a, b, strategy=strategy, precision="fp64")
    with pytest.raises(InvalidInputError, match=r"cannot be differentiated.*body\.1.*inplace=True: body\.2"):
        engine.integrate(lq, gt, steps=2)


class SubclassedConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


class BypassesConvForward(nn.Module):
    """Reads the conv's weight directly (F.conv2d), so the linear strategy's patch would not see it."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.tail(F.relu(F.conv2d(x, self.head.weight, self.head.bias, padding=1)))


def test_linear_strategy_refuses_what_it_cannot_do():
    a, b = zoo_pair("batchnorm")
    with pytest.raises(InvalidInputError, match="batch norm"):
        PathEngine(a, b, strategy="linear")
    with pytest.raises(InvalidInputError, match="train mode"):
        PathEngine(*make_pair(), strategy="linear", mode="train")
    sub = nn.Sequential(SubclassedConv(3, 3, 1)).double()
    with pytest.raises(InvalidInputError, match="own forward"):
        PathEngine(sub, sub, strategy="linear")
    torch.manual_seed(0)
    a, b = BypassesConvForward().double(), BypassesConvForward().double()
    lq, gt = zoo_images("prelu", n=1)
    engine = PathEngine(a, b, strategy="linear", precision="fp64")
    with pytest.raises(InvalidInputError, match="outside nn.Conv2d.forward"):
        engine.integrate(lq, gt, steps=2)
    ref = reference_image_faig(a, b, lq[0], gt[0], steps=2)  # the other strategies are right
    assert_equal_grads(PathEngine(a, b, strategy="persample", precision="fp64").integrate(lq, gt, steps=2),
                       [ref], engine)


# persample ----------------------------------------------------------------------------------------

def test_persample_image_chunks_back_off_on_oom(monkeypatch):
    a, b = make_pair()
    lq, gt = make_images(3)
    engine = PathEngine(a, b, strategy="persample", precision="fp64", chunk_size=4)
    real, seen = engine._persample_chunk, []

    def flaky(x, y, alphas, weights):
        seen.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, y, alphas, weights)

    monkeypatch.setattr(engine, "_persample_chunk", flaky)
    got = engine.integrate(lq, gt, steps=3)
    assert seen == [3, 1, 1, 1]  # min(chunk_size, 3) images, then halved to 1
    expected = [reference_image_faig(a, b, lq[i], gt[i], steps=3) for i in range(3)]
    assert_equal_grads(got, expected, engine)


def test_persample_falls_back_when_graph_capture_fails():
    """CUDA graphs cannot be captured on CPU: the forced attempt warns once and the eager passes answer."""
    a, b = make_pair()
    lq, gt = make_images(2)
    engine = PathEngine(a, b, strategy="persample", precision="fp64")
    engine._persample.use_graphs = True
    engine.integrate(lq, gt, steps=3)  # too few nodes to be worth a capture: not attempted
    assert engine._persample.use_graphs
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        got = engine.integrate(lq, gt, steps=16)
    assert not engine._persample.use_graphs
    expected = [reference_image_faig(a, b, lq[i], gt[i], steps=16) for i in range(2)]
    assert_equal_grads(got, expected, engine)


# pair checks on buffers ---------------------------------------------------------------------------

class WithBuffer(nn.Module):
    def __init__(self, n: int = 3, integer: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        value = torch.arange(n) if integer else torch.zeros(n)
        self.register_buffer("extra", value, persistent=False)


def test_check_pair_compares_non_persistent_and_integer_buffers():
    check_pair(*zoo_pair("batchnorm"))  # int64 num_batches_tracked is fine
    check_pair(*zoo_pair("window_attention"))
    with pytest.raises(ModelMismatchError, match="buffer 'extra' has shape"):
        check_pair(WithBuffer(3), WithBuffer(4))
    with pytest.raises(ModelMismatchError, match="buffer 'extra' is torch.int64"):
        check_pair(WithBuffer(3, integer=True), WithBuffer(3))
    bad = WithBuffer(3)
    bad.extra[1] = float("nan")
    with pytest.raises(InvalidInputError, match="buffer 'extra' contains NaN"):
        check_pair(WithBuffer(3), bad)
    nets = BatchNormNet(), BatchNormNet()
    with pytest.raises(ModelMismatchError, match="only model_b has"):
        nets[1].tail.register_buffer("more", torch.zeros(1))
        check_pair(*nets)
