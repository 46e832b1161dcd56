"""SRCNNStyle: the FAIG paper's plain 9-conv feed-forward network (six feature convs, one
pixel-shuffle upsampling conv, two reconstruction convs), with no global skip."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from faig_fast.models.registry import register_model, validate_positive, validate_scale

__all__ = ["SRCNNStyle"]


@register_model("srcnn_style", presets={
    "paper": {"num_feat": 64, "num_mid": 128},
    "tiny": {"num_feat": 16, "num_mid": 32},
})
class SRCNNStyle(nn.Module):
    """conv(in→feat) lrelu, conv(feat→mid) lrelu, 4×[conv(mid→mid) lrelu],
    conv(mid→mid·s²) PixelShuffle(s) lrelu, conv(mid→mid) lrelu, conv(mid→out).

    All 3x3 / padding 1 / LeakyReLU(0.1); parameters are `features.N.weight/bias` with conv
    indices N = 0, 2, 4, 6, 8, 10, 12, 15, 17. PyTorch's default conv initialisation is used
    (without a skip, BasicSR's ×0.1 scaling would make outputs vanish)."""

    arch_name = "srcnn_style"

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64,
                 num_mid: int = 128, upscale: int = 2):
        super().__init__()
        self.num_in_ch = validate_positive("num_in_ch", num_in_ch)
        self.num_out_ch = validate_positive("num_out_ch", num_out_ch)
        self.num_feat = validate_positive("num_feat", num_feat)
        self.num_mid = validate_positive("num_mid", num_mid)
        self.upscale = validate_scale(upscale)

        def conv(cin: int, cout: int) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, 1, 1)

        def act() -> nn.LeakyReLU:
            return nn.LeakyReLU(negative_slope=0.1, inplace=False)

        layers: list[nn.Module] = [conv(num_in_ch, num_feat), act(), conv(num_feat, num_mid), act()]
        for _ in range(4):
            layers += [conv(num_mid, num_mid), act()]
        layers += [conv(num_mid, num_mid * self.upscale ** 2), nn.PixelShuffle(self.upscale), act()]
        layers += [conv(num_mid, num_mid), act(), conv(num_mid, num_out_ch)]
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def config(self) -> dict[str, Any]:
        """{"arch", "args"}: everything needed to rebuild this model via `create_model`."""
        return {"arch": self.arch_name, "args": {
            "num_in_ch": self.num_in_ch, "num_out_ch": self.num_out_ch,
            "num_feat": self.num_feat, "num_mid": self.num_mid, "upscale": self.upscale}}
