"""Convolutional building blocks shared by the tokenizer, the ViT stages and the segmentation head.

Two families live here. The taming-transformers pieces (`ResnetBlock`, `Downsample`) keep taming's
attribute names and numerics exactly, so a VQGAN checkpoint loads and computes what it was trained to.
The EfficientViT pieces (`ConvLayer`, `MBConv`, `DSConv`, `ResidualBlock`) follow mit-han-lab's
`nn/ops.py`: conv + optional norm + optional activation, no hidden state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# taming's Normalize(): GroupNorm with eps 1e-6; the eps must match for checkpoint numerics.
TAMING_NORM_EPS = 1e-6
# Padding value on the [-1, 1] input scale: white, i.e. empty glass, the background of a brightfield slide.
PAD_VALUE_WHITE = 1.0


def build_norm(kind: str | None, channels: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm {kind!r}; expected 'bn' or None")


def build_act(kind: str | None) -> nn.Module:
    acts = {"hswish": nn.Hardswish, "relu": nn.ReLU, "silu": nn.SiLU}
    if kind is None:
        return nn.Identity()
    if kind not in acts:
        raise ValueError(f"unknown activation {kind!r}; expected one of {sorted(acts)} or None")
    # In place: the activation always follows a conv or norm whose output nothing else reads, and at
    # 4K every saved full-size temporary is tens of MB.
    return acts[kind](inplace=True)


class ConvLayer(nn.Module):
    """Conv2d -> norm -> activation, 'same' padding; the conv has a bias only when there is no norm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm: str | None = "bn",
        act: str | None = "hswish",
        bias: bool | None = None,
    ):
        super().__init__()
        bias = norm is None if bias is None else bias
        # A kernel equal to its stride is a patch projection: no padding, windows do not overlap.
        padding = 0 if kernel_size == stride else kernel_size // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias
        )
        self.norm = build_norm(norm, out_channels)
        self.act = build_act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual (MobileNetV2 / EfficientViT): 1x1 expand -> depthwise 3x3 -> 1x1 project + BN."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        expand_ratio: float = 4,
        act: str = "hswish",
    ):
        super().__init__()
        mid = round(in_channels * expand_ratio)
        self.inverted_conv = ConvLayer(in_channels, mid, 1, norm=None, act=act)
        self.depth_conv = ConvLayer(mid, mid, 3, stride=stride, groups=mid, norm=None, act=act)
        self.point_conv = ConvLayer(mid, out_channels, 1, norm="bn", act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))


class DSConv(nn.Module):
    """Depthwise-separable conv: the cheapest 3x3 spatial mixing, used where the head runs at high resolution."""

    def __init__(self, in_channels: int, out_channels: int, act: str = "hswish"):
        super().__init__()
        self.depth_conv = ConvLayer(in_channels, in_channels, 3, groups=in_channels, norm="bn", act=act)
        self.point_conv = ConvLayer(in_channels, out_channels, 1, norm="bn", act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(x))


class ResidualBlock(nn.Module):
    """x + main(x)."""

    def __init__(self, main: nn.Module):
        super().__init__()
        self.main = main

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.main(x)


class GroupNorm(nn.GroupNorm):
    """GroupNorm that stays in autocast's dtype (bf16) instead of autocast's float32; same keys, same eps.

    CUDA autocast runs group_norm in float32, so every norm + swish pair of the tokenizer would write,
    and in training keep, float32 maps twice the size of the bf16 conv outputs around them. At full
    resolution those maps are most of a 4K step's memory and its memory traffic. The kernel still
    accumulates mean and variance in float32; the output is rounded to bf16, which the next conv under
    autocast would do anyway.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        with torch.autocast(device, enabled=False):
            return F.group_norm(
                x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps
            )


def taming_norm(channels: int, groups: int) -> nn.GroupNorm:
    return GroupNorm(groups, channels, eps=TAMING_NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """taming's ResnetBlock without time embedding: GroupNorm + swish + 3x3 conv, twice, plus a shortcut.

    The shortcut is a 1x1 `nin_shortcut` only when the width changes, as in taming (no key otherwise).
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm1 = taming_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = taming_norm(out_channels, norm_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """taming's stride-2 3x3 conv with asymmetric (right/bottom) zero padding; a checkpoint expects exactly it."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def pad_to_multiple(x: torch.Tensor, multiple: int, value: float) -> torch.Tensor:
    """Pad the right and bottom of a B x C x H x W tensor so H and W are multiples of `multiple`."""
    height, width = x.shape[-2:]
    pad_h = (multiple - height % multiple) % multiple
    pad_w = (multiple - width % multiple) % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), value=value)
