"""Every reduction backend against a float64 reference, plus dispatch, validation and fallback.

Triton kernels run on CPU tensors through Triton's interpreter: ``tests/conftest.py`` sets
TRITON_INTERPRET=1 on machines without CUDA, and the tests that use it set it again themselves (the
kernel wrappers pick the interpreter at call time).  Sizes stay small because the interpreter is slow.
"""
from __future__ import annotations

import importlib.util
import shutil
import warnings

import pytest
import torch

from conftest import make_pair
from faig_fast.ops import extension as _ext
from faig_fast.ops import reduction as red
from faig_fast.errors import FAIGError, InvalidInputError
from faig_fast.ops.linear_path import linear_path_combine, linear_path_combine_torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_TOOLCHAIN = shutil.which("c++") is not None and shutil.which("ninja") is not None
TOL = {torch.float32: dict(rtol=2e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=6e-2, atol=6e-2)}


@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def clean_ext(monkeypatch):
    """Run with a fresh extension cache; restore a fresh one (reloaded from disk on next use) afterwards."""
    _ext._reset()
    red._broken.clear()
    yield
    monkeypatch.undo()
    _ext._reset()
    red._broken.clear()


def _need(backend: str, request) -> None:
    if backend == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        request.getfixturevalue("interp")
    elif backend == "cpp" and _ext.load_extension(warn=False) is None:
        if HAS_TOOLCHAIN and not _ext.disabled():
            pytest.fail(f"C++ extension failed to build: {_ext.extension_status()}")
        pytest.skip(f"C++ extension unavailable: {_ext.extension_status()}")


def _data(F: int, kk: int, B: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(F * kk, generator=gen, dtype=torch.float64).to(dtype)
    grads = torch.randn(B, F * kk, generator=gen, dtype=torch.float64).to(dtype)
    return delta, grads


def _ref(delta, grads, kk, scale=1.0):
    B, P = grads.shape
    return (delta.double() * grads.double()).abs().view(B, P // kk, kk).sum(-1) * scale


BACKENDS = ["torch", "cpp", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kk", [1, 9, 25, 81])
@pytest.mark.parametrize("B", [1, 3])
def test_filter_abs_sum_matches_reference(backend, dtype, kk, B, request):
    _need(backend, request)
    F = 37 if kk > 1 else 131  # not a multiple of any block size; kk = 1 spans several programs
    delta, grads = _data(F, kk, B, dtype, seed=kk * 10 + B)
    out = red.filter_abs_sum(delta, grads, kk, scale=0.37, backend=backend)
    assert out.shape == (B, F) and out.dtype == dtype
    torch.testing.assert_close(out.double(), _ref(delta, grads, kk, 0.37), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kk", [1, 9, 25, 81])
def test_fused_accumulate_repeated_labels(backend, dtype, kk, request):
    _need(backend, request)
    F, D = 45, 4
    delta, grads = _data(F, kk, 5, dtype, seed=kk)
    labels = torch.tensor([2, 0, 2, 2, 3])
    gen = torch.Generator().manual_seed(1)
    sums = torch.rand(D, F, generator=gen, dtype=torch.float64).to(dtype)
    expect = sums.double().clone()
    for _ in range(2):  # accumulates across calls too
        scores = red.filter_abs_sum_accumulate(delta, grads, kk, labels, sums, scale=2.0, backend=backend)
        ref = _ref(delta, grads, kk, 2.0)
        for b, lab in enumerate(labels.tolist()):
            expect[lab] += ref[b]
        torch.testing.assert_close(scores.double(), ref, **TOL[dtype])
    torch.testing.assert_close(sums.double(), expect, **TOL[dtype])
    assert sums[1].double().equal(expect[1])  # untouched label stays exactly as it was


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_by_label(backend, request):
    _need(backend, request)
    scores = torch.rand(4, 11, dtype=torch.float64)
    labels = torch.tensor([1, 1, 0, 1])
    sums = torch.ones(3, 11, dtype=torch.float64)
    red.accumulate_by_label(scores, labels, sums, backend=backend)
    expect = torch.ones(3, 11, dtype=torch.float64)
    expect[0] += scores[2]
    expect[1] += scores[0] + scores[1] + scores[3]
    torch.testing.assert_close(sums, expect)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype, request):
    _need(backend, request)
    delta, grads = _data(29, 9, 2, dtype, seed=3)
    sums = torch.zeros(2, 29, dtype=dtype)
    out = red.filter_abs_sum_accumulate(delta, grads, 9, torch.tensor([1, 1]), sums, backend=backend)
    ref = _ref(delta, grads, 9)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    torch.testing.assert_close(sums[1].double(), ref.sum(0), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_noncontiguous_sums(backend, request):
    _need(backend, request)
    kk, F, B = 9, 23, 3
    base = torch.randn(B, F * kk + 7, dtype=torch.float64)
    grads = base[:, 3:3 + F * kk]  # row stride != P
    delta = torch.randn(2 * F * kk, dtype=torch.float64)[::2]  # non-contiguous delta
    sums_store = torch.zeros(F, 2, dtype=torch.float64)
    sums = sums_store.t()  # (2, F) view, not contiguous
    out = red.filter_abs_sum_accumulate(delta, grads, kk, torch.tensor([0, 1, 0]), sums, backend=backend)
    ref = _ref(delta, grads, kk)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(sums_store.t(), torch.stack([ref[0] + ref[2], ref[1]]))
    gt = torch.randn(F * kk, B, dtype=torch.float64).t()  # column-major grads
    torch.testing.assert_close(red.filter_abs_sum(delta, gt, kk, backend=backend), _ref(delta, gt, kk))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend, request):
    _need(backend, request)
    d, g = _data(5, 9, 0, torch.float32)
    assert red.filter_abs_sum(d, g, 9, backend=backend).shape == (0, 5)
    empty_d, empty_g = torch.zeros(0), torch.zeros(2, 0)
    sums = torch.zeros(3, 0)
    out = red.filter_abs_sum_accumulate(empty_d, empty_g, 9, torch.tensor([0, 2]), sums, backend=backend)
    assert out.shape == (2, 0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_several_programs_and_large_kk(interp):
    delta, grads = _data(300, 49, 2, torch.float32, seed=5)  # 5 programs of 64 filters, kk padded to 64
    sums = torch.zeros(2, 300)
    out = red.filter_abs_sum_accumulate(delta, grads, 49, torch.tensor([1, 1]), sums, backend="triton")
    ref = _ref(delta, grads, 49)
    torch.testing.assert_close(out.double(), ref, **TOL[torch.float32])
    torch.testing.assert_close(sums[1].double(), ref.sum(0), **TOL[torch.float32])
    assert not sums[0].any()


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("call, match", [
    (lambda: red.filter_abs_sum(torch.zeros(2, 9), torch.zeros(1, 9), 9), "delta must be 1-D"),
    (lambda: red.filter_abs_sum(torch.zeros(9), torch.zeros(9), 9), "grads must be 2-D"),
    (lambda: red.filter_abs_sum(torch.zeros(9), torch.zeros(1, 18), 9), "columns"),
    (lambda: red.filter_abs_sum(torch.zeros(10), torch.zeros(1, 10), 9), "multiple of kk"),
    (lambda: red.filter_abs_sum(torch.zeros(9), torch.zeros(1, 9), 0), "kk must be >= 1"),
    (lambda: red.filter_abs_sum(torch.zeros(9), torch.zeros(1, 9), True), "kk must be a positive int"),
    (lambda: red.filter_abs_sum(torch.zeros(9), torch.zeros(1, 9), 9.0), "kk must be a positive int"),
    (lambda: red.filter_abs_sum(torch.zeros(9, dtype=torch.int32), torch.zeros(1, 9, dtype=torch.int32), 9),
     "floating point"),
    (lambda: red.filter_abs_sum(torch.zeros(9), torch.zeros(1, 9, dtype=torch.float64), 9), "share a dtype"),
    (lambda: red.filter_abs_sum(torch.zeros(9), torch.zeros(1, 9), 9, scale="x"), "scale"),
    (lambda: red.filter_abs_sum(torch.zeros(9), torch.zeros(1, 9), 9, backend="gpu"), "unknown backend"),
    (lambda: red.filter_abs_sum([0.0] * 9, torch.zeros(1, 9), 9), "must be tensors"),
    (lambda: red.filter_abs_sum_accumulate(torch.zeros(9), torch.zeros(2, 9), 9, torch.tensor([0, 3]),
                                           torch.zeros(3, 1)), r"\[0, 3\)"),
    (lambda: red.filter_abs_sum_accumulate(torch.zeros(9), torch.zeros(2, 9), 9, torch.tensor([0, -1]),
                                           torch.zeros(3, 1)), r"\[0, 3\)"),
    (lambda: red.filter_abs_sum_accumulate(torch.zeros(9), torch.zeros(2, 9), 9,
                                           torch.tensor([0, 1], dtype=torch.int32), torch.zeros(3, 1)), "int64"),
    (lambda: red.filter_abs_sum_accumulate(torch.zeros(9), torch.zeros(2, 9), 9, torch.tensor([0]),
                                           torch.zeros(3, 1)), r"shape \(2,\)"),
    (lambda: red.filter_abs_sum_accumulate(torch.zeros(9), torch.zeros(2, 9), 9, torch.tensor([0, 1]),
                                           torch.zeros(3, 2)), r"\(D, 1\)"),
    (lambda: red.filter_abs_sum_accumulate(torch.zeros(9), torch.zeros(2, 9), 9, torch.tensor([0, 1]),
                                           torch.zeros(3, 1, dtype=torch.float64)), "dtype of the scores"),
    (lambda: red.accumulate_by_label(torch.zeros(2), torch.tensor([0, 1]), torch.zeros(2, 2)), "2-D"),
])
def test_invalid_inputs(call, match):
    with pytest.raises(InvalidInputError, match=match):
        call()


def test_resolve_backend_rules(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FAIG_FAST_NO_EXT", raising=False)
    assert red.resolve_backend("cpu", "torch") == "torch"
    with pytest.raises(FAIGError, match="CUDA tensors"):
        red.resolve_backend("cpu", "cuda")
    with pytest.raises(FAIGError, match="TRITON_INTERPRET"):
        red.resolve_backend(torch.device("cpu"), "triton")
    with pytest.raises(InvalidInputError, match="unknown backend"):
        red.resolve_backend("cpu", "fast")
    with pytest.raises(FAIGError, match="CPU tensors only"):
        red.resolve_backend("cuda", "cpp")
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert red.resolve_backend("cpu", "triton") == "triton"
        assert "triton" in red.available_backends()
    if _ext.load_extension(warn=False) is not None:
        assert red.resolve_backend("cpu") == "cpp"
        assert "cpp" in red.available_backends()


# --------------------------------------------------------------------------- extension build and fallback

@pytest.mark.skipif(not HAS_TOOLCHAIN, reason="needs a C++ compiler and ninja on PATH")
def test_extension_builds(monkeypatch):
    monkeypatch.delenv("FAIG_FAST_NO_EXT", raising=False)
    mod = _ext.load_extension(warn=False)
    print("extension:", _ext.extension_status())
    assert mod is not None, _ext.extension_status()
    assert _ext.extension_status().startswith("loaded")
    assert mod.has_openmp()
    if not torch.version.cuda:
        assert not mod.has_cuda()
    # a later process finds the build on disk and loads it without compiling
    _ext._reset()
    monkeypatch.setattr(_ext, "_compile", lambda with_cuda: pytest.fail("loading a built extension compiled"))
    assert _ext.built_module_path() is not None
    assert _ext.extension_status().startswith("built, not loaded")
    assert _ext.load_extension(build=False) is not None
    assert red.resolve_backend("cpu") == "cpp"


def test_auto_never_compiles(monkeypatch, clean_ext, tmp_path, loader):
    """Backend ``auto`` on a fresh install (nothing built) runs PyTorch at once, without a compiler."""
    from faig_fast.core.api import attribute

    monkeypatch.delenv("FAIG_FAST_NO_EXT", raising=False)
    monkeypatch.setenv("FAIG_FAST_EXT_DIR", str(tmp_path))
    monkeypatch.setattr(_ext, "_compile", lambda with_cuda: pytest.fail("backend auto compiled the extension"))
    assert _ext.built_module_path() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", _ext.ExtensionUnavailableWarning)
        assert red.resolve_backend("cpu") == "torch"
        delta, grads = _data(7, 9, 2, torch.float64)
        torch.testing.assert_close(red.filter_abs_sum(delta, grads, 9), _ref(delta, grads, 9))
        assert "cpp" not in red.available_backends()
        a, b = make_pair()
        result = attribute(a, b, loader, steps=2)
    assert result.sums["blur"].shape == (len(result.index),)
    assert "faig info --build" in _ext.extension_status()


def test_no_ext_env_falls_back_and_warns_once(monkeypatch, clean_ext):
    monkeypatch.setenv("FAIG_FAST_NO_EXT", "1")
    delta, grads = _data(7, 9, 2, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert red.resolve_backend("cpu") == "torch"
        assert red.resolve_backend("cpu", "auto") == "torch"
        out = red.filter_abs_sum(delta, grads, 9)
        red.filter_abs_sum_accumulate(delta, grads, 9, torch.tensor([0, 0]), torch.zeros(1, 7))
    mine = [w for w in caught if issubclass(w.category, _ext.ExtensionUnavailableWarning)]
    assert len(mine) == 1 and "FAIG_FAST_NO_EXT" in str(mine[0].message)
    torch.testing.assert_close(out.double(), _ref(delta, grads, 9), **TOL[torch.float32])
    assert "cpp" not in red.available_backends()
    assert _ext.extension_status().startswith("disabled")
    with pytest.raises(FAIGError, match="unavailable"):
        red.resolve_backend("cpu", "cpp")


def test_build_failure_falls_back_without_raising(monkeypatch, clean_ext, tmp_path):
    monkeypatch.delenv("FAIG_FAST_NO_EXT", raising=False)
    monkeypatch.setenv("FAIG_FAST_EXT_DIR", str(tmp_path))  # nothing built there

    def broken(with_cuda):
        raise RuntimeError("Error building extension 'faig_fast_ext': g++: fatal error: simulated")

    monkeypatch.setattr(_ext, "_compile", broken)
    assert _ext.build_extension() is None  # faig info --build: fails, does not raise
    assert red.available_backends(build=True) == ["torch"] + (["triton"] if "triton" in red.available_backends()
                                                                else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert red.resolve_backend("cpu") == "torch"
        red.filter_abs_sum(torch.zeros(9), torch.zeros(1, 9), 9)
        red.filter_abs_sum(torch.zeros(9), torch.zeros(1, 9), 9)
    mine = [w for w in caught if issubclass(w.category, _ext.ExtensionUnavailableWarning)]
    assert len(mine) == 1 and "simulated" in str(mine[0].message)
    assert "simulated" in _ext.extension_status()
    with pytest.raises(FAIGError, match="simulated"):
        red.filter_abs_sum(torch.zeros(9), torch.zeros(1, 9), 9, backend="cpp")


def test_auto_survives_a_backend_failing_at_run_time(monkeypatch, clean_ext):
    class Broken:
        @staticmethod
        def has_cuda():
            return False

        @staticmethod
        def filter_abs_sum(*args):
            raise RuntimeError("kernel exploded")

    monkeypatch.delenv("FAIG_FAST_NO_EXT", raising=False)
    monkeypatch.setattr(_ext, "load_extension", lambda warn=True, build=True: Broken())
    delta, grads = _data(7, 9, 2, torch.float64)
    with pytest.warns(RuntimeWarning, match="kernel exploded"):
        out = red.filter_abs_sum(delta, grads, 9)
    torch.testing.assert_close(out, _ref(delta, grads, 9))
    assert red.resolve_backend("cpu") == "torch"
    with pytest.raises(RuntimeError, match="kernel exploded"):  # an explicit backend is not masked
        red.filter_abs_sum(delta, grads, 9, backend="cpp")


# --------------------------------------------------------------------------- linear-path epilogue

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias_kind", ["channel", "sample", None])
@pytest.mark.parametrize("slope", [None, 0.0, 0.2])
def test_linear_path_combine(backend, dtype, bias_kind, slope, request):
    _need(backend, request)
    gen = torch.Generator().manual_seed(7)
    N, C, H, W = 3, 5, 13, 17  # 3315 elements: 4 interpreter programs, the last one partial
    both = torch.randn(N, 2 * C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    a, b = both[:, :C], both[:, C:]  # batch-strided views, as from one conv with stacked weights
    alpha = torch.rand(N, generator=gen, dtype=torch.float64).to(dtype)
    bias = {"channel": torch.randn(C, generator=gen, dtype=torch.float64).to(dtype),
            "sample": torch.randn(N, C, generator=gen, dtype=torch.float64).to(dtype), None: None}[bias_kind]
    y = linear_path_combine(a, b, alpha, bias, slope, backend=backend)
    ad, bd = a.double(), b.double()
    expect = ad + alpha.double().view(-1, 1, 1, 1) * bd
    if bias is not None:
        expect = expect + (bias.double().view(1, C, 1, 1) if bias.dim() == 1 else bias.double().view(N, C, 1, 1))
    if slope is not None:
        expect = torch.where(expect >= 0, expect, expect * slope)
    assert y.shape == a.shape and y.dtype == dtype
    torch.testing.assert_close(y.double(), expect, **TOL[dtype])
    torch.testing.assert_close(linear_path_combine_torch(a, b, alpha, bias, slope).double(), expect, **TOL[dtype])


def test_linear_path_combine_dispatch_and_validation(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b, alpha, bias = torch.randn(2, 3, 4, 4), torch.rand(2), torch.randn(3)
    y = linear_path_combine(a, b, alpha, bias, 0.1)  # CPU + grad: torch path, differentiable
    y.sum().backward()
    assert a.grad is not None
    with pytest.raises(FAIGError, match="TRITON_INTERPRET"):
        with torch.no_grad():
            linear_path_combine(a, b, alpha, bias, None, backend="triton")
    with pytest.raises(FAIGError, match="forward-only"):
        linear_path_combine(a, b, alpha, bias, None, backend="triton")
    with pytest.raises(InvalidInputError, match="alpha"):
        linear_path_combine(a, b, torch.rand(3), bias, None)
    with pytest.raises(InvalidInputError, match="bias"):
        linear_path_combine(a, b, alpha, torch.randn(4), None)
    with pytest.raises(InvalidInputError, match="one shape"):
        linear_path_combine(a, b[:, :2], alpha, bias, None)
