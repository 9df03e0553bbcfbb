"""taming-transformers' VQGAN encoder, module for module, built from a `VQGANConfig` (taming's ddconfig).

`Encoder` reproduces taming's `Encoder` module tree and numerics (conv_in, down[i].block[j] ResnetBlocks,
down[i].attn[j], down[i].downsample, mid.block_1/attn_1/block_2, norm_out, conv_out), so a taming
VQModel checkpoint loads key for key. One addition: `stem_stride=2` folds the first downsampling into
conv_in, which the tiny and fast presets use to avoid many-channel convs at full resolution. `AttnBlock`
and `MidBlock` are shared with the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from custom.networks.blocks import Downsample, ResnetBlock, taming_norm
from custom.networks.config import VQGANConfig


class AttnBlock(nn.Module):
    """taming's single-head softmax self-attention over a feature map (q, k, v, proj_out are 1x1 convs)."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = taming_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        height, width = h.shape[-2:]
        # Contiguous, so SDPA can take its flash kernel rather than materialising the attention matrix.
        q, k, v = (
            rearrange(conv(h), "b c h w -> b 1 (h w) c").contiguous() for conv in (self.q, self.k, self.v)
        )
        # SDPA's default scale 1/sqrt(c) is taming's int(c) ** -0.5.
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=height, w=width))


class ResnetStack(nn.Module):
    """ResnetBlocks, each followed by attention where taming puts it: one encoder or decoder level.

    Its resampler is set by the Encoder (`downsample`) or Decoder (`upsample`) under taming's key and run
    there, since the encoder keeps a level's features before downsampling them.
    """

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attn: bool, norm_groups: int):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_groups)
            for i in range(num_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels, norm_groups) for _ in range(num_blocks) if attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """taming's VQGAN Encoder (double_z=False) with an optional stride-2 stem; returns z and level features."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, groups = cfg.ch, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, cfg.stem_stride, 1)
        in_ch_mult = (1, *cfg.ch_mult)
        current_res = cfg.resolution // cfg.stem_stride
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = ResnetStack(
                ch * in_ch_mult[i], ch * mult, cfg.num_res_blocks, current_res in cfg.attn_resolutions, groups
            )
            level.downsample = Downsample(ch * mult) if i < len(cfg.ch_mult) - 1 else None
            self.down.append(level)
            current_res //= 2
        block_in = cfg.level_channels[-1]
        self.mid = MidBlock(block_in, groups)
        self.norm_out = taming_norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)
        self.level_strides = cfg.level_strides
        self.level_channels = cfg.level_channels

    def forward(
        self, x: torch.Tensor, skip_strides: Sequence[int] = (), to_tokens: bool = True
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """x in [-1, 1] -> (z at the last level's stride, or None; level features at `skip_strides`, finest first).

        With to_tokens=False the encoder stops after the coarsest requested skip.
        """
        last_level = len(self.down) - 1
        if not to_tokens:
            last_level = max(self.level_strides.index(s) for s in skip_strides)
        h = self.conv_in(x)
        skips = []
        for i in range(last_level + 1):
            level = self.down[i]
            h = level(h)
            if self.level_strides[i] in skip_strides:
                skips.append(h)
            if level.downsample is not None and (to_tokens or i < last_level):
                h = level.downsample(h)
        if not to_tokens:
            return None, skips
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True)), skips

    def modules_after(self, stride: int) -> list[nn.Module]:
        """Modules a run that stops after the level at `stride` never uses."""
        level = self.level_strides.index(stride)
        unused = [
            self.down[level].downsample,
            *self.down[level + 1 :],
            self.mid,
            self.norm_out,
            self.conv_out,
        ]
        return [m for m in unused if m is not None]
