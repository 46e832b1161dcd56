"""PathEngine beyond the zoo: tune, device and step limits, modes, clear errors, the persample engine's
chunking and CUDA-graph fallback, and the pair checks on buffers."""
from __future__ import annotations

import contextlib
import copy
import functools
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import make_images, make_pair
from faig_fast.core.engine import ModuleRunner, PathEngine, linear_path_conv
from faig_fast.core.pair import check_pair
from faig_fast.core.path_params import private_copy
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
    for name, strategy in engine.strategies.items():
        def timed(*args, real=strategy.integrate, name=name):
            if name != fast:
                time.sleep(0.02)
            return real(*args)
        monkeypatch.setattr(strategy, "integrate", timed)
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

    for strategy in engine.strategies.values():
        monkeypatch.setattr(strategy, "integrate", oom)
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


def test_loss_at_moves_buffers_too():
    a, b = zoo_pair("batchnorm")
    lq, gt = zoo_images("batchnorm", n=1)
    engine = PathEngine(a, b, strategy="persample", precision="fp64")
    target, baseline = engine.loss_at(0.0, lq, gt), engine.loss_at(1.0, lq, gt)
    with torch.no_grad():
        assert float(target) == pytest.approx(float(sse(b(lq), gt)), rel=1e-12)
        assert float(baseline) == pytest.approx(float(sse(a(lq), gt)), rel=1e-12)
        mixed = copy.deepcopy(a)  # baseline parameters with the target's buffers
        for n, t in b.named_buffers():
            dict(mixed.named_buffers())[n].copy_(t)
        assert float(engine.loss_at(1.0, lq, gt, buffer_alpha=0.0)) == pytest.approx(float(sse(mixed(lq), gt)),
                                                                                      rel=1e-12)
    assert engine.loss_at(0.5, lq, gt).dtype == torch.float64 and engine.loss_at(0.5, lq, gt).dim() == 0
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
    wrapped = nn.Sequential(nn.Conv2d(3, 3, 1)).double()
    wrapped[0].forward = lambda x, f=wrapped[0].forward: f(x) * 2  # the linear patch would replace it
    with pytest.raises(InvalidInputError, match="own forward"):
        PathEngine(wrapped, wrapped, strategy="linear")
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
    real, seen = engine.strategies["persample"].chunk, []

    def flaky(x, y, alphas, weights):
        seen.append(x.shape[0])
        if x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, y, alphas, weights)

    monkeypatch.setattr(engine.strategies["persample"], "chunk", flaky)
    got = engine.integrate(lq, gt, steps=3)
    assert seen == [3, 1, 1, 1]  # min(chunk_size, 3) images, then halved to 1
    expected = [reference_image_faig(a, b, lq[i], gt[i], steps=3) for i in range(3)]
    assert_equal_grads(got, expected, engine)


def test_persample_falls_back_when_graph_capture_fails():
    """CUDA graphs cannot be captured on CPU: the forced attempt warns once and the eager passes answer."""
    a, b = make_pair()
    lq, gt = make_images(2)
    engine = PathEngine(a, b, strategy="persample", precision="fp64")
    persample = engine.strategies["persample"]
    persample.use_graphs = True
    engine.integrate(lq, gt, steps=3)  # too few nodes to be worth a capture: not attempted
    assert persample.use_graphs
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        got = engine.integrate(lq, gt, steps=16)
    assert not persample.use_graphs
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


# slopes and loss_at ---------------------------------------------------------------------------------

def numeric_slopes(engine, x, y, alphas, h=1e-5):
    """dL/dα through the parameters only (buffers held at α_k), by central differences of loss_at."""
    return torch.stack([(engine.loss_at(a + h, x, y, buffer_alpha=a) - engine.loss_at(a - h, x, y, buffer_alpha=a))
                        / (2 * h) for a in alphas.tolist()])


@pytest.mark.parametrize("name, strategy", [("pair", "loop"), ("pair", "vmap"), ("pair", "persample"),
                                            ("pair", "linear"), ("batchnorm", "loop"), ("batchnorm", "vmap"),
                                            ("batchnorm", "persample")])
def test_slopes_are_the_parameters_share_of_dL_dalpha(name, strategy):
    a, b = make_pair() if name == "pair" else zoo_pair("batchnorm")
    lq, gt = make_images(2) if name == "pair" else zoo_images("batchnorm")
    engine = PathEngine(a, b, strategy=strategy, precision="fp64", chunk_size=2)
    images = engine.integrate(lq, gt, "gausslegendre", 3)
    alphas, weights = nodes_and_weights("gausslegendre", 3)
    for i, img in enumerate(images):
        assert img.slopes.shape == (3,) and img.slopes.dtype == torch.float64
        torch.testing.assert_close(img.slopes, numeric_slopes(engine, lq[i:i + 1], gt[i:i + 1], alphas),
                                   rtol=1e-6, atol=1e-9)
        total = sum((engine.delta[n] * g).sum() for n, g in img.grads.items())
        torch.testing.assert_close((weights * img.slopes).sum(), total, rtol=1e-10, atol=1e-12)


# the module runner ------------------------------------------------------------------------------------

def test_runner_math_mode_sets_tf32_by_precision_and_restores_it(monkeypatch):
    a, _ = make_pair()
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for precision, inside in [("fp32", False), ("bf16", False), ("fp64", False), ("tf32", True)]:
            runner = ModuleRunner(a, precision=precision)
            runner.device = torch.device("cuda")  # the flags are global: no GPU needed to see them set
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not inside
            with runner.math_mode():
                assert torch.backends.cuda.matmul.allow_tf32 is inside and torch.backends.cudnn.allow_tf32 is inside
            assert torch.backends.cuda.matmul.allow_tf32 is (not inside)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_passes_and_losses_run_under_the_math_mode():
    a, b = make_pair()
    lq, gt = make_images(1)
    engine = PathEngine(a, b, strategy="persample", precision="fp64")
    depth, seen = [0], []

    @contextlib.contextmanager
    def counting():
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    real = engine.space.params_at
    engine.space.params_at = lambda *args: (seen.append(depth[0]), real(*args))[1]
    engine.runner.math_mode = counting
    engine.integrate(lq, gt, steps=2)
    engine.loss_at(1.0, lq, gt)
    assert seen and all(d >= 1 for d in seen)
    seen.clear()
    engine.forward(0.0, lq.to(engine.dtype))  # a bare forward is the caller's to wrap
    assert seen == [0]


def test_runner_chunks_halve_on_oom_and_plan_from_the_budget():
    a, _ = make_pair()
    runner = ModuleRunner(a, precision="fp64", memory_budget=1000)
    assert runner.plan_chunk(50, 10) == 50 and runner.plan_chunk(50, 100) == 5 and runner.plan_chunk(50, 10**6) == 1
    assert ModuleRunner(a, chunk_size=3).plan_chunk(50, 10**9) == 3
    calls = []

    def run(start, stop):
        calls.append((start, stop))
        if stop - start > 2:
            raise torch.OutOfMemoryError("simulated")

    runner.run_chunks(7, 8, run)
    assert calls == [(0, 7), (0, 4), (0, 2), (2, 4), (4, 6), (6, 7)]
    with pytest.raises(torch.OutOfMemoryError):
        runner.run_chunks(3, 1, lambda s, e: run(0, 3))
    assert runner.net is not a and runner.dtype == torch.float64
    assert not any(p.requires_grad for p in runner.net.parameters())


def test_private_copy_rebinds_closures_defaults_and_hooks():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    conv = m[0]

    def forward(x, c=conv):  # a default that names the caller's module
        return nn.Conv2d.forward(c, x) * 2
    conv.forward = forward
    m.register_forward_hook(lambda mod, inp, out: out + conv.bias.sum())  # a hook closing over a module
    m.extra = functools.partial(lambda x, k: conv(x) * k, k=2.0)  # a partial of a closure
    copy_ = private_copy(m, "eval")
    twin = copy_[0]
    assert copy_.extra.func.__closure__[0].cell_contents is twin and m.extra.func.__closure__[0].cell_contents is conv
    assert twin.forward.__defaults__[0] is twin and conv.forward is forward and forward.__defaults__[0] is conv
    hook = next(iter(copy_._forward_hooks.values()))
    assert hook.__closure__[0].cell_contents is twin
    with torch.no_grad():
        twin.bias.add_(1.0)
        x = torch.rand(1, 3, 2, 2)
        expected = torch.relu(F.conv2d(x, twin.weight, twin.bias) * 2) + twin.bias.sum()
        torch.testing.assert_close(copy_(x), expected)


def test_fused_linear_path_conv_differentiates_alpha_too(monkeypatch):
    """The Triton epilogue (interpreted on CPU) gives the PyTorch combine's gradients, α's included
    (the linear strategy's slopes come from it)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    dw, db = torch.randn_like(conv.weight), torch.randn_like(conv.bias)
    x0 = torch.rand(3, 4, 5, 5)
    grads = []
    for fused in (False, True):
        x = x0.clone().requires_grad_()
        w = conv.weight.detach().clone().requires_grad_()
        b = conv.bias.detach().clone().requires_grad_()
        alphas = torch.tensor([0.0, 0.3, 0.9]).requires_grad_()
        y = linear_path_conv(x, w, dw, b, db, alphas, conv, fused=fused)
        grads.append(torch.autograd.grad((y ** 2).sum(), (x, w, b, alphas)))
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-5)
    assert grads[1][3].abs().sum() > 0
