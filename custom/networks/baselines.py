"""Tile-based baselines for the paper's Table 1: MONAI's UNet and SwinUNETR-V2, both in 2D.

Each wraps the MONAI net with the HoloHisto input contract (B x 3 x H x W in [0, 1], any H x W,
logits B x num_classes x H x W back) and records its constructor arguments in `config`, so
`build_network(network_config(model))` rebuilds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.nets import SwinUNETR, UNet
from torch import nn

from custom.networks.blocks import PAD_VALUE_WHITE, pad_to_multiple


class UNetBaseline(nn.Module):
    """MONAI `UNet` (2D, residual units) on [0, 1] RGB tiles."""

    network_name = "unet"

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 2,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        strides: Sequence[int] = (2, 2, 2, 2),
        num_res_units: int = 2,
        norm: str = "batch",
    ):
        super().__init__()
        self.config = {
            "in_chans": in_chans,
            "num_classes": num_classes,
            "channels": list(channels),
            "strides": list(strides),
            "num_res_units": num_res_units,
            "norm": norm,
        }
        self.net = UNet(
            spatial_dims=2,
            in_channels=in_chans,
            out_channels=num_classes,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            norm=norm,
        )
        self.size_multiple = math.prod(strides)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        logits = self.net(pad_to_multiple(x * 2 - 1, self.size_multiple, PAD_VALUE_WHITE))
        return logits[..., :height, :width]


class SwinUNETRBaseline(nn.Module):
    """MONAI `SwinUNETR` with use_v2=True (residual conv blocks before each Swin stage), 2D."""

    network_name = "swin_unetr"
    # Patch embedding (x2) then four patch-merging stages (x2 each).
    size_multiple = 32

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 2,
        feature_size: int = 24,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
    ):
        super().__init__()
        self.config = {
            "in_chans": in_chans,
            "num_classes": num_classes,
            "feature_size": feature_size,
            "depths": list(depths),
            "num_heads": list(num_heads),
            "window_size": window_size,
        }
        self.net = SwinUNETR(
            in_channels=in_chans,
            out_channels=num_classes,
            feature_size=feature_size,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            spatial_dims=2,
            use_v2=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        logits = self.net(pad_to_multiple(x * 2 - 1, self.size_multiple, PAD_VALUE_WHITE))
        return logits[..., :height, :width]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """MONAI's own switch: every Swin block reads `use_checkpoint` at each forward."""
        for module in self.net.modules():
            if hasattr(module, "use_checkpoint"):
                module.use_checkpoint = enable
