"""LAM (local attribution maps) on the engine: the batched computation equals a plain per-step loop
written here after the reference (cv2.filter2D blurs, batch 1, one step at a time); the analytic
kernel derivative equals finite differences; DI/Gini on hand-computed arrays; guards."""
from __future__ import annotations

import copy
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TinySR
from test_zoo import ZOO, WindowAttention, assert_identical, snapshot, zoo_pair

from faig_fast.core.blur_path import (filter_image, gaussian_kernels, gaussian_kernels_dsigma, path_nodes,
                                      reflect101_index)
from faig_fast.core.lam import (LocalAttribution, LocalAttributor, diffusion_index, gini, lam,
                                window_objective)
from faig_fast.errors import FAIGError, InvalidInputError


# the oracle: the reference's structure, written independently -----------------------------------
def ref_kernel(l: int, sigma: float) -> np.ndarray:
    ax = np.arange(-l // 2 + 1.0, l // 2 + 1.0)
    xx, yy = np.meshgrid(ax, ax)
    k = np.exp(-(xx ** 2 + yy ** 2) / (2.0 * (sigma + 1e-5) ** 2))
    return k / k.sum()


def cv_filter(chw: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    hwc = np.ascontiguousarray(np.moveaxis(chw, 0, 2))
    out = cv2.filter2D(hwc, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    return np.moveaxis(out.reshape(hwc.shape), 2, 0)


def ref_objective(y: torch.Tensor, row: int, col: int, size: int) -> torch.Tensor:
    h_grad = (y[:, :, :-1, :] - y[:, :, 1:, :]) ** 2
    w_grad = (y[:, :, :, :-1] - y[:, :, :, 1:]) ** 2
    g = (h_grad[:, :, :, :-1] + w_grad[:, :, :-1, :]) ** 0.5
    return g[:, :, row:row + size, col:col + size].sum()


def reference_lam(model: nn.Module, image: torch.Tensor, window, steps: int, sigma: float = 1.2, l: int = 9,
                  mode: str = "eval", dtype=torch.float64):
    """Mean over i of ∇D(F(x ⊛ K_i)) ⊙ (x ⊛ (K_i − K_{i−1})·N), batch 1, one step at a time.
    Returns (map, number of non-finite gradient entries)."""
    net = copy.deepcopy(model).to(dtype)
    net.train(mode == "train")
    x = image.double().numpy()
    sig = np.linspace(sigma, 0, steps + 1)
    ks = [ref_kernel(l, s) for s in sig]
    total, bad = np.zeros_like(x), 0
    for i in range(steps):
        xi = torch.from_numpy(cv_filter(x, ks[i + 1])).to(dtype)[None].requires_grad_()
        deriv = cv_filter(x, (ks[i + 1] - ks[i]) * steps)
        (g,) = torch.autograd.grad(ref_objective(net(xi.clone()), *window), xi)
        g = g[0].double().numpy()
        bad += int((~np.isfinite(g)).sum())
        total += g * deriv
    return torch.from_numpy(total / steps), bad


class PadToWindow(nn.Module):
    """Swin-style: pads the input to a multiple of its 3×3 window, runs window attention, crops back."""

    def __init__(self):
        super().__init__()
        self.body = WindowAttention()

    def forward(self, x):
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % 3, 0, (-h) % 3), mode="reflect")
        return self.body(x)[..., :h, :w]


def make(name: str) -> tuple[nn.Module, torch.Tensor, tuple]:
    """A float64 model of the zoo, an image it accepts and a window inside its output."""
    g = torch.Generator().manual_seed(3)
    if name == "tiny_sr":
        torch.manual_seed(0)
        return TinySR().double().eval(), torch.rand(3, 8, 8, generator=g, dtype=torch.float64), (3, 5, 6)
    if name == "pad_to_window":
        torch.manual_seed(0)
        return PadToWindow().double().eval(), torch.rand(3, 8, 10, generator=g, dtype=torch.float64), (2, 3, 4)
    _, model = zoo_pair(name)
    cin, scale = ZOO[name][1], ZOO[name][3]
    size = 9 if name == "window_attention" else 8
    return model, torch.rand(cin, size, size, generator=g, dtype=torch.float64), (2, 2, 4 * scale)


ARCHS = ["tiny_sr", "pad_to_window", "window_attention", "batchnorm", "inplace_input", "pixel_shuffle",
         "gray_denoiser", "noise_map_input", "conv_transpose", "grouped_depthwise"]


# blur path ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.0, 0.3, 1.2, 2.5])
def test_kernel_is_the_reference_kernel(sigma):
    k = gaussian_kernels(torch.tensor([sigma], dtype=torch.float64), 9)[0].numpy()
    np.testing.assert_allclose(k, ref_kernel(9, sigma), rtol=1e-13, atol=1e-300)
    assert k.sum() == pytest.approx(1.0, abs=1e-14)


def test_kernel_at_zero_is_the_identity():
    x = torch.rand(2, 5, 7, dtype=torch.float64)
    assert torch.equal(filter_image(x, gaussian_kernels(torch.tensor([0.0]), 9))[0], x)


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.6, 0.95, 0.999])
def test_analytic_kernel_derivative_equals_central_differences(alpha):
    sigma, h = 1.2, 1e-6
    nodes = path_nodes("gausslegendre", 1, sigma, 9)  # only for its analytic formula below
    assert nodes.deriv.shape == (1, 9, 9)

    def k(a):
        return gaussian_kernels(torch.tensor([sigma * (1 - a)], dtype=torch.float64), 9)[0]

    fd = (k(alpha + h) - k(alpha - h)) / (2 * h)
    analytic = -sigma * gaussian_kernels_dsigma(torch.tensor([sigma * (1 - alpha)], dtype=torch.float64), 9)[0]
    torch.testing.assert_close(analytic, fd, rtol=1e-6, atol=1e-8)
    if alpha < 0.9:  # near α = 1 the kernel is numerically the identity and both sides vanish
        assert float(fd.abs().max()) > 1e-2


def test_gauss_legendre_nodes_use_the_analytic_derivative():
    nodes = path_nodes("gausslegendre", 3, 1.2, 9)
    s = 1.2 * (1 - nodes.alphas)
    torch.testing.assert_close(nodes.deriv, -1.2 * gaussian_kernels_dsigma(s, 9), rtol=0, atol=0)
    torch.testing.assert_close(nodes.blur, gaussian_kernels(s, 9), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 8, 10), (1, 3, 5), (4, 2, 1)])
def test_blur_equals_cv2_filter2d_reflect101(shape):
    x = torch.rand(*shape, dtype=torch.float64)
    k = ref_kernel(9, 0.9)
    ours = filter_image(x, torch.from_numpy(k)[None])[0].numpy()
    np.testing.assert_allclose(ours, cv_filter(x.numpy(), k), rtol=1e-12, atol=1e-14)


def test_reflect101_index_folds():
    assert reflect101_index(4, 2).tolist() == [2, 1, 0, 1, 2, 3, 2, 1]
    assert reflect101_index(2, 3).tolist() == [1, 0, 1, 0, 1, 0, 1, 0]


# the map equals the per-step loop -----------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHS)
def test_lam_equals_per_step_loop_at_fp64(name):
    model, image, window = make(name)
    expected, bad = reference_lam(model, image, window, steps=3)
    assert bad == 0 and float(expected.abs().max()) > 0
    for ibs in (None, 1, 2):
        r = lam(model, image, window, steps=3, precision="fp64", internal_batch_size=ibs)
        torch.testing.assert_close(r.attribution, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
        assert r.nan_gradients == 0 and r.attribution.shape == image.shape


def test_train_mode_batchnorm_runs_nodes_one_at_a_time():
    model, image, window = make("batchnorm")
    expected, _ = reference_lam(model, image, window, steps=3, mode="train")
    att = LocalAttributor(model, steps=3, precision="fp64", mode="train")
    assert att.one_at_a_time
    r = att.attribute([image], [[window]])[0][0]
    torch.testing.assert_close(r.attribution, expected, rtol=1e-9, atol=1e-12 * float(expected.abs().max()))
    assert not LocalAttributor(model, steps=3, precision="fp64").one_at_a_time


def test_fp32_equals_the_reference_to_float32_rounding():
    model, image, window = make("tiny_sr")
    expected, _ = reference_lam(model.float(), image.float(), window, steps=5, dtype=torch.float32)
    r = lam(model.float(), image.float(), window, steps=5)
    torch.testing.assert_close(r.attribution, expected, rtol=2e-4, atol=2e-5 * float(expected.abs().max()))


def test_windows_list_equals_separate_calls_and_images_share_passes():
    model, image, _ = make("tiny_sr")
    windows = [(0, 0, 4), (5, 6, 8), (10, 2, 5)]
    together = lam(model, image, windows, steps=3, precision="fp64", internal_batch_size=2)
    assert isinstance(together, list) and len(together) == 3
    for w, r in zip(windows, together):
        alone = lam(model, image, w, steps=3, precision="fp64")
        torch.testing.assert_close(r.attribution, alone.attribution, rtol=1e-10, atol=1e-14)
        assert r.meta["window"] == list(w) and r.diffusion_index == pytest.approx(alone.diffusion_index, rel=1e-9)
    # two images of one size and unequal window counts, in one call
    other = torch.rand_like(image)
    att = LocalAttributor(model, steps=3, precision="fp64", internal_batch_size=4)
    both = att.attribute([image, other], [windows, windows[1:2]])
    torch.testing.assert_close(both[0][2].attribution, together[2].attribution, rtol=1e-10, atol=1e-14)
    alone = lam(model, other, windows[1], steps=3, precision="fp64")
    torch.testing.assert_close(both[1][0].attribution, alone.attribution, rtol=1e-10, atol=1e-14)


class Smooth(nn.Module):
    """conv → tanh → conv, residual: an integrand smooth in α (no ReLU kinks)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.tanh(self.a(x)))


def test_completeness_error_falls_with_gauss_legendre_nodes():
    torch.manual_seed(0)
    model = Smooth().double()
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errs = [lam(model, image, (0, 0, 6), steps=n, method="gausslegendre", precision="fp64").completeness
            for n in (4, 8, 16, 32)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3
    reference_rule = lam(model, image, (0, 0, 6), steps=32, precision="fp64")  # first-order: slower
    assert reference_rule.completeness > 10 * errs[-1]


def test_completeness_relates_the_sum_to_the_objective():
    model, image, window = make("tiny_sr")
    r = lam(model, image, window, steps=8, method="gausslegendre", precision="fp64")
    out = model(image[None])
    d1 = float(window_objective(out.detach(), window)[0])
    blurred = torch.from_numpy(cv_filter(image.numpy(), ref_kernel(9, 1.2)))[None]
    d0 = float(window_objective(model(blurred).detach(), window)[0])
    assert r.meta["d_input"] == pytest.approx(d1, rel=1e-12)
    assert r.meta["d_baseline"] == pytest.approx(d0, rel=1e-12)
    assert r.completeness == pytest.approx(abs(float(r.attribution.sum()) - (d1 - d0)) / abs(d1 - d0), rel=1e-9)


# DI and Gini ------------------------------------------------------------------------------------
def test_gini_on_hand_computed_arrays():
    e = 1e-7
    # one spike among four: Σ(2i − n − 1)v = 3(1 + e) + e(−3 − 1 + 1) = 3; n Σ v = 4(1 + 4e)
    assert gini([0, 0, 0, 1]) == pytest.approx(3 / (4 * (1 + 4 * e)), rel=1e-12)
    assert gini([3.0, 1.0]) == pytest.approx(((3 + e) - (1 + e)) / (2 * (4 + 2 * e)), rel=1e-12)
    assert gini(np.full(7, 0.5)) == pytest.approx(0.0, abs=1e-15)
    # negatives are shifted: [-1, 1] → [0, 2]
    assert gini([-1.0, 1.0]) == pytest.approx(((2 + e) - e) / (2 * (2 + 2 * e)), rel=1e-12)


def test_diffusion_index_on_hand_computed_maps():
    a = torch.zeros(2, 2, 2, dtype=torch.float64)
    a[0, 0, 0], a[1, 0, 0] = 3.0, -1.0          # Σ_c = 2 at (0, 0)
    a[0, 1, 1], a[1, 1, 1] = 1.0, -3.0          # Σ_c = −2 → |·| = 2 at (1, 1)
    a[0, 0, 1], a[1, 0, 1] = 1.0, -1.0          # cancels to 0
    # v = [1, 0, 0, 1]: Gini = (−3e − e + (1 + e) + 3(1 + e)) / (4 (2 + 4e)) = (4 + 0e)/(8 + 16e)
    e = 1e-7
    expected = (1 - (-3 * e - e + (1 + e) + 3 * (1 + e)) / (4 * (2 + 4 * e))) * 100
    assert diffusion_index(a) == pytest.approx(expected, rel=1e-12)
    assert diffusion_index(torch.ones(1, 3, 3)) == pytest.approx(100.0)
    assert math.isnan(diffusion_index(torch.zeros(3, 4, 4)))
    nan_map = torch.ones(1, 2, 2)
    nan_map[0, 0, 0] = float("nan")
    assert math.isnan(diffusion_index(nan_map))


def test_window_objective_equals_the_reference_objective():
    y = torch.rand(2, 3, 9, 11, dtype=torch.float64)
    for w in [(0, 0, 3), (4, 5, 5), (5, 7, 4), (8 - 1, 0, 2)]:
        assert float(window_objective(y, w).sum()) == pytest.approx(float(ref_objective(y, *w)), rel=1e-13)


# module semantics, NaN, guards ------------------------------------------------------------------
def test_callers_model_and_image_are_bit_identical_afterwards():
    for name, mode in (("inplace_input", "eval"), ("batchnorm", "train")):
        model, image, window = make(name)
        before = snapshot(model, image)
        lam(model, image, [window, (0, 0, 3)], steps=2, precision="fp32", mode=mode)
        assert_identical(before, snapshot(model, image))


class Flat(nn.Module):
    """conv1×1(x) · mask: exactly 0 in a block inside the window, so D there is sqrt(0), whose gradient
    is NaN (the reference zeroes these silently)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 1, 1)
        mask = torch.ones(1, 1, 12, 12)
        mask[..., 4:8, 4:8] = 0
        self.register_buffer("mask", mask)

    def forward(self, x):
        return self.c(x) * self.mask


def test_nan_gradients_are_counted_and_left_in_the_map():
    image = torch.rand(1, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.manual_seed(0)
    model = Flat().double()
    expected, bad = reference_lam(model, image, (2, 2, 8), steps=3)
    assert bad > 0
    r = lam(model, image, (2, 2, 8), steps=3, precision="fp64")
    assert r.nan_gradients == bad
    assert torch.equal(torch.isnan(r.attribution), torch.isnan(expected))
    assert math.isnan(r.diffusion_index)
    quiet = lam(model, image, (2, 8, 3), steps=3, precision="fp64")  # textured window: no NaN
    assert quiet.nan_gradients == 0 and bool(torch.isfinite(quiet.attribution).all())


def test_scale_is_inferred_and_meta_is_complete():
    model, image, window = make("gray_denoiser")
    r = lam(model, image, window, steps=2)
    assert r.meta["scale"] == 1 and r.output.shape == image.shape
    sr = lam(*make("tiny_sr")[:2], (0, 0, 4), steps=2, method="gausslegendre")
    assert sr.meta["scale"] == 2 and sr.output.shape[-2:] == (16, 16)
    for key in ("rule", "steps", "sigma", "kernel_size", "window", "model_sha256", "seconds", "method"):
        assert key in sr.meta
    assert sr.meta["rule"] == "gausslegendre/2"


@pytest.mark.parametrize("window", [(0, 0, 17), (-1, 0, 3), (15, 0, 1), (0, 14, 3), (3, 3, 0)])
def test_window_outside_the_output_is_refused(window):
    model, image, _ = make("tiny_sr")  # 8×8 → 16×16
    with pytest.raises(InvalidInputError, match="outside the model's 16x16 output"):
        lam(model, image, window, steps=2)
    lam(model, image, (14, 14, 2), steps=1)  # the last full window is accepted


def test_bad_inputs_are_refused():
    model, image, window = make("tiny_sr")
    bad = image.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="NaN or Inf"):
        lam(model, bad, window)
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        lam(model, image * 3, window)
    with pytest.raises(InvalidInputError, match="unknown method"):
        lam(model, image, window, method="simpson")
    with pytest.raises(InvalidInputError, match="odd"):
        lam(model, image, window, kernel_size=8)
    with pytest.raises(InvalidInputError, match="sigma"):
        lam(model, image, window, sigma=0)
    with pytest.raises(InvalidInputError, match="window"):
        lam(model, image, (1, 2))
    with pytest.raises(InvalidInputError, match="steps"):
        lam(model, image, window, steps=0)


def test_model_failing_on_the_input_size_is_a_clear_error():
    model, _, _ = make("window_attention")  # needs sides divisible by 3
    with pytest.raises(FAIGError, match="cannot run on an input of shape"):
        lam(model, torch.rand(3, 8, 8, dtype=torch.float64), (0, 0, 3), steps=2)
    lam(model, torch.rand(3, 9, 9, dtype=torch.float64), (0, 0, 3), steps=1)


def test_bf16_and_fp32_agree_with_fp64():
    model, image, window = make("tiny_sr")
    ref = lam(model, image, window, steps=4, precision="fp64").attribution
    for precision, tol in (("fp32", 1e-4), ("bf16", 0.1)):
        got = lam(model, image, window, steps=4, precision=precision).attribution
        assert float((got - ref).norm() / ref.norm()) < tol


def test_save_load_and_figure(tmp_path):
    model, image, window = make("tiny_sr")
    r = lam(model, image, window, steps=2)
    path = r.save(tmp_path / "map.safetensors")
    back = LocalAttribution.load(path)
    assert torch.equal(back.attribution, r.attribution) and torch.equal(back.output, r.output)
    assert back.diffusion_index == r.diffusion_index and back.meta == r.meta
    assert (tmp_path / "map.json").is_file()
    fig = r.save_figure(tmp_path / "lam.png")
    assert fig.is_file() and fig.stat().st_size > 1000
    (tmp_path / "junk.safetensors").write_bytes(b"nope")
    with pytest.raises(InvalidInputError, match="not a LAM result"):
        LocalAttribution.load(tmp_path / "junk.safetensors")


# benchmark helpers (smoke: tiny sizes, no timing assertions) --------------------------------------
def test_naive_loop_and_bench_and_study_smoke(tmp_path):
    from faig_fast.apps.lam_bench import bench_lam, lam_study, lam_study_markdown, naive_lam, spread_windows

    model, image, window = make("tiny_sr")
    model, image = model.float(), image.float()
    naive = naive_lam(model, image, window, steps=4)
    exact = lam(model, image, window, steps=4)
    np.testing.assert_allclose(naive, exact.attribution.numpy(), rtol=1e-4, atol=1e-5 * float(np.abs(naive).max()))
    ws = spread_windows((16, 16), 3, 6)
    assert len(ws) == 3 and all(r + 6 <= 16 and c + 6 <= 16 for r, c, _ in ws)
    doc = bench_lam(model, image, ws, steps=4, fast_nodes=2)
    assert set(doc["cases"]) == {"naive", "lam", "fast", "windows_one_call", "windows_single_calls"}
    assert doc["cases"]["naive"]["pearson_r"] > 0.9999
    assert doc["cases"]["windows_one_call"]["min_pearson_r_vs_single"] > 0.9999
    study = lam_study(model, [("img", image)], windows=2, window_size=6, reference_steps=24, lam_steps=6,
                      nodes=(2, 8), out=tmp_path / "study.json")
    assert [r["nodes"] for r in study["rows"]] == [2, 8] and (tmp_path / "study.json").is_file()
    assert study["rows"][1]["mean_pearson_r"] > study["rows"][0]["mean_pearson_r"]
    assert "fewest nodes" in lam_study_markdown(study)


def test_contribution_density_is_scipy_gaussian_kde():
    from scipy import stats

    from faig_fast.core.lam_figures import contribution_density

    v = np.zeros((20, 24))
    v[5:9, 10:15] = np.random.default_rng(0).random((4, 5))
    v[15, 3] = 0.5
    yy, xx = np.mgrid[0:20, 0:24]
    pix = np.vstack([xx.ravel(), yy.ravel()])
    z = stats.gaussian_kde(pix, weights=v.ravel())(pix).reshape(v.shape)
    np.testing.assert_allclose(contribution_density(v), z / z.max(), atol=1e-4)
    assert contribution_density(np.zeros((4, 4))) is None
    assert contribution_density(np.full((4, 4), np.nan)) is None
