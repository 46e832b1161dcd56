"""Shared fixtures: tiny model pairs and images that make FAIG tests fast on 2 CPU cores."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests that parametrize the Triton backend run its kernels through Triton's CPU interpreter when
# there is no GPU, also from a plain `pytest` (not only `make test`): set it before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)  # tiny tensors: one thread is faster and immune to oversubscribed cores

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


class TinySR(nn.Module):
    """A plain ×2 SR net (conv → LeakyReLU → conv → PixelShuffle) that is not from the registry."""

    def __init__(self, feat: int = 4, scale: int = 2):
        super().__init__()
        self.head = nn.Conv2d(3, feat, 3, padding=1)
        self.mid = nn.Conv2d(feat, feat, 1)
        self.tail = nn.Conv2d(feat, 3 * scale * scale, 3, padding=1)
        self.shuffle = nn.PixelShuffle(scale)
        self.upscale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.head(x), 0.1)
        h = F.leaky_relu(self.mid(h), 0.1)
        return self.shuffle(self.tail(h)) + F.interpolate(x, scale_factor=self.upscale, mode="bilinear",
                                                          align_corners=False)


class GrayDenoiser(nn.Module):
    """DnCNN-style: one channel in and out, scale 1 (declared nowhere), residual learning."""

    def __init__(self, feat: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, feat, 3, padding=1), nn.ReLU(), nn.Conv2d(feat, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.body(x)


def make_pair(feat: int = 4, seed: int = 0, dtype=torch.float64, noise: float = 0.05):
    """A baseline and a nearby target, as fine-tuning would give."""
    torch.manual_seed(seed)
    a = TinySR(feat).to(dtype)
    b = TinySR(feat).to(dtype)
    b.load_state_dict({k: v + noise * torch.randn_like(v) for k, v in a.state_dict().items()})
    return a.eval(), b.eval()


def registry_pair(arch: str = "msrresnet", noise: float = 0.05, seed: int = 0, weights_only: bool = False):
    """A tiny registry model and a copy perturbed by ``noise``·N(0, 1) (conv weights only if asked)."""
    from faig_fast.models import create_model

    torch.manual_seed(seed)
    a = create_model(arch, preset="tiny", upscale=2).eval()
    b = create_model(arch, preset="tiny", upscale=2).eval()
    b.load_state_dict({k: v + (0 if weights_only and not k.endswith("weight") else noise) * torch.randn_like(v)
                       for k, v in a.state_dict().items()})
    return a, b


def make_images(n: int = 3, size: int = 6, seed: int = 1, dtype=torch.float64, scale: int = 2):
    g = torch.Generator().manual_seed(seed)
    gt = torch.rand(n, 3, size * scale, size * scale, generator=g, dtype=dtype)
    lq = F.avg_pool2d(gt, scale).clamp(0, 1)
    return lq, gt


def make_loader(labels=("blur", "noise", "blur"), size: int = 6, dtype=torch.float64, seed: int = 1):
    lq, gt = make_images(len(labels), size, seed, dtype)
    return [(lq[i], gt[i], labels[i]) for i in range(len(labels))]


@pytest.fixture
def pair():
    return make_pair()


@pytest.fixture
def loader():
    return make_loader()


def perturb_(model: torch.nn.Module, noise: float, g: torch.Generator) -> torch.nn.Module:
    """Add Gaussian noise to every floating parameter and buffer in place (running variances kept
    positive): a fine-tuned-looking target from a copy of the baseline."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.add_(noise * torch.randn(t.shape, generator=g, dtype=t.dtype))
        for n, t in model.named_buffers():
            if "running_var" in n:
                t.abs_()
    return model


def write_pair_and_images(folder):
    """A tiny SRCNN-style pair (``a.safetensors``, ``b.safetensors``) and two 16×18 random images in
    ``imgs/`` under ``folder``, for CLI tests; returns ``folder``."""
    import numpy as np
    from PIL import Image

    from faig_fast.models import save_model

    a, b = registry_pair("srcnn_style")
    save_model(a, folder / "a.safetensors")
    save_model(b, folder / "b.safetensors")
    (folder / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 18, 3), dtype=np.uint8)).save(folder / "imgs" / f"{i}.png")
    return folder
