"""pytest-benchmark timings of the per-filter reduction backends at MSRResNet 16x64 size.

151,936 filters of 3x3 (P = 1,367,424) for a batch of B = 4 images, on CUDA when available, else CPU.
Run: ``.venv/bin/python -m pytest benchmarks/bench_reduction.py`` (``--benchmark-disable`` for a smoke run
that calls each case once); ``pytest.ini`` makes pytest collect the ``bench_*.py`` files.
Triton on CPU tensors would time Triton's interpreter, so it is only benchmarked on GPU.
"""
from __future__ import annotations

import pytest
import torch

from faig_fast.ops import reduction as red
from faig_fast.ops.linear_path import linear_path_combine
from faig_fast.utils.device import sync

N_FILTERS, KK, BATCH, N_LABELS = 151_936, 9, 4, 3
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backends() -> list[str]:
    found = red.available_backends(build=True)  # the C++ extension is timed too, so build it first
    if DEVICE.type == "cpu":
        return [b for b in found if b in ("torch", "cpp")]
    return [b for b in found if b in ("torch", "cuda", "triton")]


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    delta = torch.randn(N_FILTERS * KK, device=DEVICE, generator=gen)
    grads = torch.randn(BATCH, N_FILTERS * KK, device=DEVICE, generator=gen)
    labels = torch.tensor([0, 1, 1, 2], device=DEVICE)
    sums = torch.zeros(N_LABELS, N_FILTERS, device=DEVICE)
    return delta, grads, labels, sums


@pytest.mark.parametrize("backend", _backends())
def test_filter_abs_sum(benchmark, data, backend):
    delta, grads, _, _ = data
    benchmark.group = f"filter_abs_sum {N_FILTERS}x{KK} B={BATCH} {DEVICE.type}"

    def run():
        out = red.filter_abs_sum(delta, grads, KK, backend=backend)
        sync(DEVICE)
        return out

    out = benchmark(run)
    torch.testing.assert_close(out, red.filter_abs_sum(delta, grads, KK, backend="torch"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_filter_abs_sum_accumulate(benchmark, data, backend):
    delta, grads, labels, sums = data
    benchmark.group = f"filter_abs_sum_accumulate {N_FILTERS}x{KK} B={BATCH} {DEVICE.type}"

    def run():
        out = red.filter_abs_sum_accumulate(delta, grads, KK, labels, sums, backend=backend)
        sync(DEVICE)
        return out

    out = benchmark(run)
    assert out.shape == (BATCH, N_FILTERS)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the Triton epilogue only runs compiled on GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_path_combine(benchmark, backend):
    benchmark.group = "linear_path_combine 4x64x128x128"
    a, b = torch.randn(2, 4, 64, 128, 128, device=DEVICE).unbind(0)
    alpha, bias = torch.rand(4, device=DEVICE), torch.randn(64, device=DEVICE)

    def run():
        with torch.no_grad():
            out = linear_path_combine(a, b, alpha, bias, 0.1, backend=backend)
        sync(DEVICE)
        return out

    benchmark(run)
