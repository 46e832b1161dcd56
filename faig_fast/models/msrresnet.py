"""MSRResNet, a line-for-line port of BasicSR's `basicsr/archs/srresnet_arch.py`, so BasicSR
checkpoints (e.g. the FAIG paper's baseline/target models) load with identical state-dict keys."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from faig_fast.models.registry import register_model, validate_positive, validate_scale

__all__ = ["MSRResNet", "ResidualBlockNoBN", "default_init_weights"]


@torch.no_grad()
def default_init_weights(modules: nn.Module | Iterable[nn.Module], scale: float = 1.0,
                         bias_fill: float = 0.0) -> None:
    """BasicSR's initialisation: kaiming_normal weights scaled by `scale`, constant biases."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                m.weight.mul_(scale)
                if m.bias is not None:
                    nn.init.constant_(m.bias, bias_fill)


class ResidualBlockNoBN(nn.Module):
    """identity + conv2(relu(conv1(x))) * res_scale, as BasicSR (non-inplace ReLU for torch.func)."""

    def __init__(self, num_feat: int = 64, res_scale: float = 1.0, pytorch_init: bool = False):
        super().__init__()
        self.res_scale = res_scale
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1, bias=True)
        self.relu = nn.ReLU(inplace=False)
        if not pytorch_init:
            default_init_weights([self.conv1, self.conv2], 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.relu(self.conv1(x)))
        return x + out * self.res_scale


@register_model("msrresnet", presets={
    "paper": {"num_feat": 64, "num_block": 16},
    "tiny": {"num_feat": 16, "num_block": 2},
})
class MSRResNet(nn.Module):
    """Modified SRResNet (no BN) with pixel-shuffle upsampling and a bilinear global skip."""

    arch_name = "msrresnet"

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64,
                 num_block: int = 16, upscale: int = 4):
        super().__init__()
        self.num_in_ch = validate_positive("num_in_ch", num_in_ch)
        self.num_out_ch = validate_positive("num_out_ch", num_out_ch)
        self.num_feat = validate_positive("num_feat", num_feat)
        self.num_block = validate_positive("num_block", num_block, minimum=0)
        self.upscale = validate_scale(upscale)

        self.conv_first = nn.Conv2d(num_in_ch, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(num_feat) for _ in range(num_block)])

        if self.upscale in (2, 3):
            self.upconv1 = nn.Conv2d(num_feat, num_feat * self.upscale * self.upscale, 3, 1, 1)
            self.pixel_shuffle = nn.PixelShuffle(self.upscale)
        else:  # upscale == 4: two x2 stages
            self.upconv1 = nn.Conv2d(num_feat, num_feat * 4, 3, 1, 1)
            self.upconv2 = nn.Conv2d(num_feat, num_feat * 4, 3, 1, 1)
            self.pixel_shuffle = nn.PixelShuffle(2)

        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, num_out_ch, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.1, inplace=False)

        default_init_weights([self.conv_first, self.upconv1, self.conv_hr, self.conv_last], 0.1)
        if self.upscale == 4:
            default_init_weights(self.upconv2, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.lrelu(self.conv_first(x))
        out = self.body(feat)
        if self.upscale == 4:
            out = self.lrelu(self.pixel_shuffle(self.upconv1(out)))
            out = self.lrelu(self.pixel_shuffle(self.upconv2(out)))
        else:
            out = self.lrelu(self.pixel_shuffle(self.upconv1(out)))
        out = self.conv_last(self.lrelu(self.conv_hr(out)))
        base = F.interpolate(x, scale_factor=self.upscale, mode="bilinear", align_corners=False)
        return out + base

    def config(self) -> dict[str, Any]:
        """{"arch", "args"}: everything needed to rebuild this model via `create_model`."""
        return {"arch": self.arch_name, "args": {
            "num_in_ch": self.num_in_ch, "num_out_ch": self.num_out_ch,
            "num_feat": self.num_feat, "num_block": self.num_block, "upscale": self.upscale}}
