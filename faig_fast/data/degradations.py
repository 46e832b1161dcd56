"""The degradation model of the FAIG paper (Eq. 1): ``x = (x_gt ⊛ k)↓r + n``, in pure PyTorch.

Defaults follow the paper: isotropic Gaussian blur (21×21, σ=2), bilinear ×2 downsampling, additive
Gaussian noise σ=0.1 on the [0, 1] scale (25.5/255), then rounding to 8-bit levels and clipping.

The semantics match the authors' OpenCV pipeline so results are comparable with theirs:

* blur = ``cv2.filter2D`` with ``BORDER_REFLECT_101`` borders and the kernel
  ``getGaussianKernel(21, 2) ⊗ getGaussianKernel(21, 2)`` (applied here as two separable 1-D passes,
  identical up to float rounding);
* downsample = ``cv2.resize(..., (w // r, h // r), interpolation=INTER_LINEAR)``: half-pixel centres,
  no antialiasing, i.e. ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` to
  the exact output size;
* noise is drawn on the CPU from a ``torch.Generator`` and then moved to the image's device, so a
  seed gives the same result on CPU and GPU.

Images are floating tensors, CHW or BCHW, in [0, 1], with any number of channels (each is degraded
on its own: RGB, grayscale, ...). ``scale=1`` skips the downsampling (denoising, deblurring). Every
step is differentiable except ``quantize``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from faig_fast.data.images import modcrop
from faig_fast.errors import InvalidInputError

__all__ = [
    "DEGRADATIONS",
    "Degradation",
    "DegradationSpec",
    "add_noise",
    "blur",
    "downsample",
    "gaussian_kernel",
    "make_degradation",
    "quantize",
]


# ----------------------------------------------------------------------------- validation helpers
def _check_image(img: Tensor, where: str) -> None:
    if not isinstance(img, Tensor):
        raise InvalidInputError(f"{where}: expected a torch.Tensor image, got {type(img).__name__}")
    if img.dim() not in (3, 4):
        raise InvalidInputError(f"{where}: expected a CHW or BCHW image, got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        raise InvalidInputError(f"{where}: expected a floating-point image in [0, 1], got dtype {img.dtype}")


def _check_sigma(sigma: float, name: str) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise InvalidInputError(f"{name} must be a finite number > 0, got {sigma!r}")
    return float(sigma)


def _check_kernel_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise InvalidInputError(f"kernel_size must be an odd int >= 1, got {size!r}")
    return size


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise InvalidInputError(f"scale must be an int >= 1, got {scale!r}")
    return scale


# ------------------------------------------------------------------------------------------ steps
def _gaussian_1d(size: int, sigma: float) -> Tensor:
    """``cv2.getGaussianKernel(size, sigma)`` (computed in float64, normalised to sum 1)."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    return k / k.sum()


def gaussian_kernel(size: int = 21, sigma: float = 2.0) -> Tensor:
    """The isotropic 2-D Gaussian blur kernel ``k`` (size×size, float32, sums to 1), as the outer
    product of ``cv2.getGaussianKernel(size, sigma)`` with itself."""
    size, sigma = _check_kernel_size(size), _check_sigma(sigma, "blur sigma")
    k1 = _gaussian_1d(size, sigma)
    k2 = torch.outer(k1, k1)
    return (k2 / k2.sum()).float()


def reflect101_index(n: int, pad: int, device: torch.device | None = None) -> Tensor:
    """Source indices of a length-``n`` axis padded by ``pad`` on each side with OpenCV's
    BORDER_REFLECT_101 (``dcb|abcd|cba``), folding repeatedly when ``pad >= n`` (unlike ``F.pad``)."""
    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx > n - 1, period - idx, idx)


def blur(img: Tensor, sigma: float = 2.0, kernel_size: int = 21) -> Tensor:
    """Convolve each channel with the Gaussian kernel (``cv2.filter2D`` with BORDER_REFLECT_101);
    output has the input's shape. Works for any image size, including ones smaller than the kernel."""
    _check_image(img, "blur")
    kernel_size, sigma = _check_kernel_size(kernel_size), _check_sigma(sigma, "blur sigma")
    squeeze = img.dim() == 3
    x = img.unsqueeze(0) if squeeze else img
    b, c, h, w = x.shape
    pad = kernel_size // 2
    x = x.reshape(b * c, 1, h, w)
    x = x.index_select(2, reflect101_index(h, pad, x.device))
    x = x.index_select(3, reflect101_index(w, pad, x.device))
    k = _gaussian_1d(kernel_size, sigma).to(device=x.device, dtype=x.dtype)
    x = F.conv2d(x, k.view(1, 1, kernel_size, 1))  # vertical pass
    x = F.conv2d(x, k.view(1, 1, 1, kernel_size))  # horizontal pass
    x = x.reshape(b, c, h, w)
    return x.squeeze(0) if squeeze else x


def downsample(img: Tensor, scale: int = 2) -> Tensor:
    """Bilinear downsampling by ``scale`` to ``(h // scale, w // scale)`` with half-pixel centres and
    no antialiasing, as ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)``."""
    _check_image(img, "downsample")
    scale = _check_scale(scale)
    h, w = img.shape[-2:]
    out = (h // scale, w // scale)
    if out[0] < 1 or out[1] < 1:
        raise InvalidInputError(f"downsample: image of size {h}x{w} is smaller than scale {scale}")
    squeeze = img.dim() == 3
    x = img.unsqueeze(0) if squeeze else img
    x = F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=False)
    return x.squeeze(0) if squeeze else x


def bicubic_down(hr: Tensor, scale: int) -> Tensor:
    """The LR input of an HR image (C, H, W) as the LAM paper makes it: modcrop, bicubic ÷scale with
    antialiasing (as PIL's BICUBIC resize), clamped to [0, 1]."""
    hr = modcrop(hr, _check_scale(scale))
    if scale == 1:
        return hr
    h, w = hr.shape[-2:]
    lr = F.interpolate(hr[None], size=(h // scale, w // scale), mode="bicubic", align_corners=False, antialias=True)
    return lr[0].clamp(0, 1)


def add_noise(img: Tensor, sigma: float = 0.1, generator: torch.Generator | None = None) -> Tensor:
    """Add i.i.d. Gaussian noise of std ``sigma`` (on the [0, 1] scale). The noise is drawn on the CPU
    (from ``generator``, a CPU generator, or torch's global one) so a seed is device-independent."""
    _check_image(img, "add_noise")
    sigma = _check_sigma(sigma, "noise sigma")
    if generator is not None and generator.device.type != "cpu":
        raise InvalidInputError(f"add_noise: generator must be a CPU torch.Generator, got one on {generator.device}")
    noise = torch.randn(tuple(img.shape), generator=generator, dtype=torch.float32)
    return img + (noise * sigma).to(device=img.device, dtype=img.dtype)


def quantize(img: Tensor) -> Tensor:
    """Round to 8-bit levels and clip to [0, 1]: ``clip(round(x * 255), 0, 255) / 255``."""
    _check_image(img, "quantize")
    return torch.round(img * 255).clamp_(0, 255) / 255


# ---------------------------------------------------------------------------------- composition
@dataclass(frozen=True)
class Degradation:
    """One degradation of Eq. 1: blur (if ``blur_sigma``) → bilinear ↓``scale`` (none for ``scale=1``)
    → noise (if ``noise_sigma``) → 8-bit quantisation. Calling it maps a GT image (CHW/BCHW, any
    channel count) to its LQ image."""

    blur_sigma: float | None
    noise_sigma: float | None
    scale: int = 2
    kernel_size: int = 21

    def __post_init__(self) -> None:
        if self.blur_sigma is not None:
            _check_sigma(self.blur_sigma, "blur_sigma")
        if self.noise_sigma is not None:
            _check_sigma(self.noise_sigma, "noise_sigma")
        _check_scale(self.scale)
        _check_kernel_size(self.kernel_size)

    @property
    def label(self) -> str:
        """The label of this degradation: ``clean``, ``blur``, ``noise`` or ``blur+noise``."""
        parts = [name for name, on in (("blur", self.blur_sigma), ("noise", self.noise_sigma)) if on is not None]
        return "+".join(parts) or "clean"

    def __call__(self, gt: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Degrade ``gt``; ``generator`` seeds the noise (unused when there is none)."""
        _check_image(gt, f"Degradation({self.label})")
        x = gt
        if self.blur_sigma is not None:
            x = blur(x, self.blur_sigma, self.kernel_size)
        if self.scale > 1:
            x = downsample(x, self.scale)
        if self.noise_sigma is not None:
            x = add_noise(x, self.noise_sigma, generator)
        return quantize(x)


class DegradationSpec(NamedTuple):
    """Which steps a degradation label switches on."""

    blur: bool
    noise: bool


DEGRADATIONS: dict[str, DegradationSpec] = {
    "clean": DegradationSpec(blur=False, noise=False),
    "blur": DegradationSpec(blur=True, noise=False),
    "noise": DegradationSpec(blur=False, noise=True),
    "blur+noise": DegradationSpec(blur=True, noise=True),
}


def make_degradation(
    label: str,
    *,
    scale: int = 2,
    blur_sigma: float = 2.0,
    noise_sigma: float = 0.1,
    kernel_size: int = 21,
) -> Degradation:
    """The ``Degradation`` for a label in ``DEGRADATIONS`` with the given (paper-default) parameters."""
    spec = DEGRADATIONS.get(label) if isinstance(label, str) else None
    if spec is None:
        raise InvalidInputError(f"unknown degradation label {label!r}; valid labels: {', '.join(DEGRADATIONS)}")
    return Degradation(
        blur_sigma=_check_sigma(blur_sigma, "blur_sigma") if spec.blur else None,
        noise_sigma=_check_sigma(noise_sigma, "noise_sigma") if spec.noise else None,
        scale=scale,
        kernel_size=kernel_size,
    )
