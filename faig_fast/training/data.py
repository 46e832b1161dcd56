"""Training images held in memory as uint8, and seeded sampling of degraded training batches."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import Tensor

from faig_fast.data.degradations import add_noise, blur, downsample, quantize
from faig_fast.data.images import list_images, read_image
from faig_fast.errors import InvalidInputError
from faig_fast.training.config import TrainConfig

__all__ = ["DataSource", "load_training_images", "sample_batch"]

PathLike = Union[str, "os.PathLike[str]"]
DataSource = Union[PathLike, Sequence[PathLike]]


def _read_uint8(path: Path) -> Tensor:
    """An image file as a uint8 CHW RGB tensor (kept as uint8 to hold a training set in memory);
    decoding is :func:`faig_fast.data.images.read_image`'s (8-bit levels round-trip exactly)."""
    return read_image(path).mul_(255.0).round_().to(torch.uint8)


def load_training_images(data: DataSource, min_side: int = 1) -> list[Tensor]:
    """Read a folder (or a list of image paths) once into memory as uint8 CHW RGB tensors, in
    sorted/given order. Images with a side below ``min_side`` raise InvalidInputError."""
    if isinstance(data, (str, os.PathLike)):
        paths = list_images(data)
    else:
        paths = [Path(p) for p in data]
        if not paths:
            raise InvalidInputError("training data is an empty list of images")
    images = []
    for p in paths:
        img = _read_uint8(p)
        if min(img.shape[-2:]) < min_side:
            raise InvalidInputError(
                f"training image {p} ({img.shape[-2]}x{img.shape[-1]}) is smaller than the GT patch "
                f"size {min_side}")
        images.append(img)
    return images


def _randint(high: int, gen: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=gen))


def _random_crops(images: Sequence[Tensor], count: int, size: int, gen: torch.Generator) -> Tensor:
    """``count`` random ``size``² crops (uint8) with random h/v flips and transposes."""
    crops = []
    for _ in range(count):
        img = images[_randint(len(images), gen)]
        h, w = img.shape[-2:]
        top, left = _randint(h - size + 1, gen), _randint(w - size + 1, gen)
        crop = img[:, top:top + size, left:left + size]
        hflip, vflip, rot = (torch.rand(3, generator=gen) < 0.5).tolist()
        if hflip:
            crop = crop.flip(-1)
        if vflip:
            crop = crop.flip(-2)
        if rot:
            crop = crop.transpose(-1, -2)
        crops.append(crop)
    return torch.stack(crops)


def sample_batch(images: Sequence[Tensor], cfg: TrainConfig, gen: torch.Generator
                 ) -> tuple[Tensor, Tensor]:
    """One training batch ``(lq, gt)`` (float32 BCHW in [0, 1]) drawn from ``gen``: random GT crops
    with random h/v flips and transposes, degraded per sample with blur (prob ``blur_prob``) →
    bilinear ↓ → noise (prob ``noise_prob``) → 8-bit quantisation."""
    gt = _random_crops(images, cfg.batch_size, cfg.patch_size, gen).float().div_(255.0)
    b = cfg.batch_size
    blur_on = torch.rand(b, generator=gen) < cfg.blur_prob
    noise_on = torch.rand(b, generator=gen) < cfg.noise_prob
    x = gt
    if bool(blur_on.any()):
        x = torch.where(blur_on.view(b, 1, 1, 1), blur(gt, cfg.blur_sigma, cfg.kernel_size), gt)
    x = downsample(x, cfg.scale)
    if bool(noise_on.any()):
        x = torch.where(noise_on.view(b, 1, 1, 1), add_noise(x, cfg.noise_sigma, gen), x)
    return quantize(x), gt
