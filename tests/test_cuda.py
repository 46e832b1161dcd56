"""On a CUDA device: every engine strategy × precision × reduction backend against the fp64 CPU reference,
and the reduction kernels and the linear-path epilogue compiled for real (Triton JIT, the CUDA extension).
Skipped without CUDA; ``make gpu-check`` runs this file first."""
from __future__ import annotations

import pytest
import torch

from conftest import make_loader, make_pair
from faig_fast.core.api import attribute
from faig_fast.core.reference import reference_attribute
from faig_fast.kernels._interpret import interpret_enabled
from faig_fast.ops import reduction as red
from faig_fast.ops.linear_path import linear_path_combine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda)")

STRATEGIES = ["loop", "vmap", "linear", "persample", "tune"]
PRECISIONS = ["fp64", "fp32", "tf32", "bf16"]
BACKENDS = ["torch", "cuda", "triton"]
# max |score − reference| / max |reference|: fp32 must be fp32 (no silent TF32 convolutions)
REL_TOL = {"fp64": 1e-9, "fp32": 1e-4, "tf32": 3e-2, "bf16": 8e-2}
STEPS, METHOD = 4, "gausslegendre"


@pytest.fixture(scope="module")
def reference():
    a, b = make_pair(feat=8)
    loader = make_loader(size=8)
    return a, b, loader, reference_attribute(a, b, loader, steps=STEPS, method=METHOD)


def test_triton_is_compiled_not_interpreted():
    assert not interpret_enabled(), "TRITON_INTERPRET=1 is set: the CUDA tests would not compile Triton"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_engine_matches_fp64_cpu_reference(reference, strategy, precision, backend):
    a, b, loader, ref = reference
    res = attribute(a, b, loader, steps=STEPS, method=METHOD, device="cuda", strategy=strategy,
                    precision=precision, backend=backend)
    assert res.labels == ref.labels
    for label in ref.labels:
        got, want = res.sums[label].double().cpu(), ref.sums[label].double()
        err = float((got - want).abs().max() / want.abs().max())
        assert err < REL_TOL[precision], f"{strategy}/{precision}/{backend} {label}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kk", [1, 9, 25])
def test_reduction_backends_on_cuda(backend, dtype, kk):
    g = torch.Generator().manual_seed(kk)
    F, B, D = 1000, 3, 2
    delta = torch.randn(F * kk, generator=g, dtype=torch.float64)
    grads = torch.randn(B, F * kk, generator=g, dtype=torch.float64)
    ref = (delta * grads).abs().view(B, F, kk).sum(-1) * 0.5
    labels = torch.tensor([1, 0, 1], device="cuda")
    sums = torch.zeros(D, F, dtype=dtype, device="cuda")
    out = red.filter_abs_sum_accumulate(delta.to("cuda", dtype), grads.to("cuda", dtype), kk, labels, sums,
                                        scale=0.5, backend=backend)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    torch.testing.assert_close(sums[1].double().cpu(), ref[0] + ref[2], rtol=tol,
                               atol=2 * tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_path_combine_triton_on_cuda(dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 16, 33, 35, generator=g, dtype=torch.float64).to("cuda", dtype).unbind(0)
    alpha, bias = torch.rand(3, dtype=dtype).cuda(), torch.randn(16, dtype=dtype).cuda()
    with torch.no_grad():
        got = linear_path_combine(a, b, alpha, bias, 0.2, backend="triton")
        want = linear_path_combine(a, b, alpha, bias, 0.2, backend="torch")
    torch.testing.assert_close(got, want)
