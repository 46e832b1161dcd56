"""The torch degradation pipeline against an OpenCV/numpy re-implementation of the authors' one."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from faig_fast.data.degradations import (
    DEGRADATIONS,
    Degradation,
    add_noise,
    blur,
    downsample,
    gaussian_kernel,
    make_degradation,
    quantize,
)
from faig_fast.errors import InvalidInputError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ------------------------------------------------------------------------ reference (OpenCV)
def cv_kernel(size: int = 21, sigma: float = 2.0) -> np.ndarray:
    k1 = cv2.getGaussianKernel(size, sigma)
    k = k1 @ k1.T
    return k / k.sum()


def cv_blur(hwc: np.ndarray, sigma: float = 2.0, size: int = 21) -> np.ndarray:
    return cv2.filter2D(hwc, -1, cv_kernel(size, sigma), borderType=cv2.BORDER_REFLECT_101)


def cv_down(hwc: np.ndarray, scale: int) -> np.ndarray:
    h, w = hwc.shape[:2]
    out = cv2.resize(hwc, (w // scale, h // scale), interpolation=cv2.INTER_LINEAR)
    return out.reshape(h // scale, w // scale, -1)


def cv_pipeline(hwc: np.ndarray, scale: int, blur_sigma: float | None, noise: np.ndarray | None) -> np.ndarray:
    x = hwc.astype(np.float32)
    if blur_sigma is not None:
        x = cv_blur(x, blur_sigma).reshape(hwc.shape)  # OpenCV drops a single channel's axis
    if scale > 1:
        x = cv_down(x, scale)
    if noise is not None:
        x = x + noise
    return np.clip(np.round(x * 255), 0, 255) / 255


def to_hwc(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy()


def to_chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()


def real_image() -> np.ndarray:
    """A real photo, float32 HWC RGB in [0, 1]: Set5/butterfly if present, else skimage astronaut."""
    path = SHARED_DATA / "Set5" / "butterfly.png"
    if path.is_file():
        arr = np.asarray(Image.open(path).convert("RGB"))
    else:
        import skimage.data

        arr = skimage.data.astronaut()[:256, :256]
    return arr.astype(np.float32) / 255


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


# ------------------------------------------------------------------------------------ steps
def test_gaussian_kernel_matches_cv2() -> None:
    k = gaussian_kernel()
    assert k.shape == (21, 21) and k.dtype == torch.float32
    np.testing.assert_allclose(k.numpy(), cv_kernel(), atol=1e-8)
    assert abs(float(k.sum()) - 1) < 1e-6
    np.testing.assert_allclose(gaussian_kernel(7, 1.3).numpy(), cv_kernel(7, 1.3), atol=1e-8)


@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (33, 34), (7, 5), (1, 9), (12, 1)])
def test_blur_matches_filter2d(shape: tuple[int, int]) -> None:
    img = random_image(*shape)
    ref = cv_blur(img).reshape(img.shape)
    out = to_hwc(blur(to_chw(img)))
    assert out.shape == img.shape
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_blur_other_sigma_and_size() -> None:
    img = random_image(30, 41, seed=1)
    ref = cv_blur(img, sigma=1.2, size=9)
    np.testing.assert_allclose(to_hwc(blur(to_chw(img), sigma=1.2, kernel_size=9)), ref, atol=1e-5)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("shape", [(37, 53), (64, 64), (33, 34), (7, 5)])
def test_downsample_matches_cv2_resize(scale: int, shape: tuple[int, int]) -> None:
    img = random_image(*shape, seed=scale)
    out = downsample(to_chw(img), scale)
    assert out.shape == (3, shape[0] // scale, shape[1] // scale)
    np.testing.assert_allclose(to_hwc(out), cv_down(img, scale), atol=1e-5)


def test_downsample_scale_1_is_identity() -> None:
    img = to_chw(random_image(9, 11))
    torch.testing.assert_close(downsample(img, 1), img)


def test_add_noise_statistics_and_seed() -> None:
    img = torch.full((3, 64, 64), 0.5)
    a = add_noise(img, 0.1, torch.Generator().manual_seed(3))
    b = add_noise(img, 0.1, torch.Generator().manual_seed(3))
    c = add_noise(img, 0.1, torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert abs(float((a - img).std()) - 0.1) < 0.01
    # exactly the generator's randn, scaled
    torch.testing.assert_close(a - img, 0.1 * torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(3)))


def test_quantize() -> None:
    x = torch.tensor([-0.2, 0.0, 0.5 / 255, 1.49 / 255, 0.5, 1.0, 1.3])
    q = quantize(x.view(1, 1, 1, -1)).flatten()
    expect = torch.tensor([0.0, 0.0, 0.0, 1 / 255, 128 / 255, 1.0, 1.0])  # round half to even like numpy
    torch.testing.assert_close(q, expect)
    assert torch.equal(torch.round(q * 255), q * 255)


# ------------------------------------------------------------------------------ full pipeline
def _compare(img: np.ndarray, label: str, scale: int, seed: int = 0, min_equal: float = 0.999) -> None:
    deg = make_degradation(label, scale=scale)
    gen = torch.Generator().manual_seed(seed)
    out = to_hwc(deg(to_chw(img), generator=gen))
    h, w, c = img.shape[0] // scale, img.shape[1] // scale, img.shape[2]
    noise = None
    if deg.noise_sigma is not None:  # the same draws the torch pipeline made
        noise = to_hwc(deg.noise_sigma * torch.randn(c, h, w, generator=torch.Generator().manual_seed(seed)))
    ref = cv_pipeline(img, scale, deg.blur_sigma, noise)
    assert out.shape == ref.shape == (h, w, c)
    diff = np.abs(out - ref)
    assert diff.max() <= 1 / 255 + 1e-6
    assert (diff < 1e-6).mean() >= min_equal, f"only {(diff < 1e-6).mean():.4%} of pixels equal"


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("label", list(DEGRADATIONS))
def test_pipeline_matches_opencv_on_real_image(label: str, scale: int) -> None:
    # Without blur or noise, downsampling an 8-bit image averages 8-bit levels, so many values land
    # exactly on a rounding tie (n + 0.5)/255, which float rounding breaks either way in either
    # implementation: a few percent of pixels then differ by one level (never more).
    min_equal = 0.95 if label == "clean" else 0.999
    _compare(real_image(), label, scale=scale, min_equal=min_equal)


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("label", ["clean", "blur+noise"])
def test_pipeline_matches_opencv_on_odd_sizes(label: str, scale: int) -> None:
    _compare(random_image(61, 47, seed=scale), label, scale=scale, seed=scale)


@pytest.mark.parametrize("label", list(DEGRADATIONS))
def test_grayscale_scale_1_matches_opencv(label: str) -> None:
    """A 1-channel image at scale 1 (denoising/deblurring data): no downsampling, the same blur and noise."""
    gray = np.round(real_image()[:96, :96] @ np.array([0.299, 0.587, 0.114], np.float32) * 255)[:, :, None] / 255
    _compare(gray.astype(np.float32), label, scale=1, min_equal=1.0 if label == "clean" else 0.999)


def test_scale_1_skips_the_downsampling() -> None:
    img = to_chw(random_image(9, 11)[:, :, :1])
    noisy = make_degradation("noise", scale=1)(img, torch.Generator().manual_seed(0))
    expect = quantize(img + 0.1 * torch.randn(1, 9, 11, generator=torch.Generator().manual_seed(0)))
    assert noisy.shape == (1, 9, 11) and torch.equal(noisy, expect)
    assert torch.equal(make_degradation("blur", scale=1)(img), quantize(blur(img)))


def test_paper_defaults() -> None:
    d = make_degradation("blur+noise")
    assert d == Degradation(blur_sigma=2.0, noise_sigma=0.1, scale=2, kernel_size=21)
    assert d.label == "blur+noise"
    assert make_degradation("clean") == Degradation(None, None)
    assert make_degradation("blur").noise_sigma is None and make_degradation("noise").blur_sigma is None
    for label in DEGRADATIONS:
        assert make_degradation(label).label == label


def test_output_is_8bit_in_range() -> None:
    out = make_degradation("blur+noise")(to_chw(random_image(20, 20)), torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(torch.round(out * 255), out * 255)


def test_seeded_determinism() -> None:
    img = to_chw(random_image(32, 32))
    d = make_degradation("noise")
    a = d(img, torch.Generator().manual_seed(7))
    b = d(img, torch.Generator().manual_seed(7))
    c = d(img, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    blur_only = make_degradation("blur")
    assert torch.equal(blur_only(img, torch.Generator().manual_seed(1)), blur_only(img, torch.Generator().manual_seed(2)))


def test_bchw_batch_equals_per_image() -> None:
    imgs = torch.stack([to_chw(random_image(25, 30, seed=s)) for s in range(3)])
    d = make_degradation("blur", scale=3)
    out = d(imgs)
    assert out.shape == (3, 3, 8, 10)
    for i in range(3):
        torch.testing.assert_close(out[i], d(imgs[i]), atol=1e-6, rtol=0)
    # noise for a batch is one draw of the batch's shape
    dn = make_degradation("noise", scale=2)
    out = dn(imgs, torch.Generator().manual_seed(0))
    assert out.shape == (3, 3, 12, 15)


def test_float64_and_gradients() -> None:
    img = to_chw(random_image(16, 16)).double().requires_grad_(True)
    y = downsample(blur(img), 2)
    y.sum().backward()
    assert img.grad is not None and img.grad.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu() -> None:
    img = to_chw(random_image(40, 40))
    d = make_degradation("blur+noise")
    cpu = d(img, torch.Generator().manual_seed(0))
    gpu = d(img.cuda(), torch.Generator().manual_seed(0)).cpu()
    assert (cpu - gpu).abs().max() <= 1 / 255 + 1e-6
    assert ((cpu - gpu).abs() < 1e-6).float().mean() > 0.99


# ------------------------------------------------------------------------------- validation
def test_unknown_label_lists_valid_ones() -> None:
    with pytest.raises(InvalidInputError, match="clean, blur, noise, blur\\+noise"):
        make_degradation("jpeg")
    with pytest.raises(InvalidInputError):
        make_degradation(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scale": 0},
        {"scale": 2.0},
        {"scale": True},
        {"blur_sigma": 0},
        {"blur_sigma": -1.0},
        {"blur_sigma": float("nan")},
        {"noise_sigma": 0.0},
        {"kernel_size": 20},
        {"kernel_size": 0},
    ],
)
def test_parameter_validation(kwargs: dict) -> None:
    with pytest.raises(InvalidInputError):
        make_degradation("blur+noise", **kwargs)


def test_step_validation() -> None:
    img = torch.rand(3, 8, 8)
    with pytest.raises(InvalidInputError, match="kernel_size"):
        blur(img, kernel_size=4)
    with pytest.raises(InvalidInputError, match="sigma"):
        add_noise(img, sigma=-0.1)
    with pytest.raises(InvalidInputError, match="smaller than scale"):
        downsample(img, 9)
    with pytest.raises(InvalidInputError, match="shape"):
        blur(torch.rand(8, 8))
    with pytest.raises(InvalidInputError, match="dtype"):
        quantize(torch.zeros(3, 4, 4, dtype=torch.uint8))
    with pytest.raises(InvalidInputError, match="Tensor"):
        downsample(np.zeros((3, 4, 4)))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        Degradation(blur_sigma=None, noise_sigma=None, scale=-1)
