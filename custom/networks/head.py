"""The segmentation head: EfficientViT-style fusion of the ViT stages, then x2 steps to full resolution.

Each x2 step adds the tokenizer's encoder feature of its stride (the skips keep boundaries sharp); a 1x1
conv to 4 * num_classes channels and a pixel shuffle give full-resolution logits without any
full-resolution conv. In eval mode the steps run tile by tile (bounded memory, same result); in training
they can be checkpointed (`set_grad_checkpointing`), which is where a 4K step's memory sits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from custom.networks.blocks import ConvLayer, DSConv, MBConv, ResidualBlock
from custom.networks.checkpointing import checkpoint_seq, maybe_checkpoint

# The final x2 step: a 1x1 conv predicts the 2 x 2 sub-pixels of each half-resolution position.
FINAL_UPSCALE = 2
# Margin of a head tile, in tokens: the decoder's receptive field below the token grid (bilinear x2
# steps and 3x3 depthwise convs at 1/8, 1/4, 1/2) spans under 3 tokens.
HEAD_HALO_TOKENS = 4


class DecoderStep(nn.Module):
    """One x2 step of the head: reduce and upsample the coarser map, add the skip of this stride, mix."""

    def __init__(self, in_channels: int | None, skip_channels: int | None, width: int):
        super().__init__()
        # Reduce before upsampling: the 1x1 conv then runs on 4x fewer pixels.
        self.reduce = ConvLayer(in_channels, width, 1, act=None) if in_channels else None
        self.skip_proj = ConvLayer(skip_channels, width, 1, act=None) if skip_channels else None
        self.block = ResidualBlock(DSConv(width, width))

    def forward(self, x: torch.Tensor | None, skip: torch.Tensor | None) -> torch.Tensor:
        parts = []
        if self.reduce is not None and x is not None:
            parts.append(
                F.interpolate(self.reduce(x), scale_factor=2.0, mode="bilinear", align_corners=False)
            )
        if self.skip_proj is not None and skip is not None:
            parts.append(self.skip_proj(skip))
        return self.block(parts[0] if len(parts) == 1 else parts[0] + parts[1])


class SegmentationHead(nn.Module):
    """EfficientViT-style stage fusion at the token stride, then x2 decoder steps down to full resolution.

    In eval mode the decoder (everything finer than the token grid) runs on tiles of `tile_px` output
    pixels with a margin of HEAD_HALO_TOKENS tokens, which covers its receptive field, so the result
    equals the untiled one while every intermediate stays a few MB. Untiled, a 4K patch's
    half-resolution maps are hundreds of MB each, and on a CPU the cache misses and page faults of
    such maps made the head's time grow ~9x per 4x pixels. Training stays untiled: batch-norm
    statistics must see the whole batch.
    """

    def __init__(
        self,
        stage_channels: Sequence[int],
        skip_channels: dict[int, int],
        token_stride: int,
        head_width: int,
        head_depth: int,
        decoder_widths: Sequence[int],
        num_classes: int,
        expand_ratio: float,
        tile_px: int = 0,
        context_channels: int = 0,
    ):
        super().__init__()
        strides = [token_stride // 2 ** (i + 1) for i in range(len(decoder_widths))]
        if not strides or strides[-1] != FINAL_UPSCALE:
            raise ValueError(
                f"decoder_widths needs one width per x2 step from the token stride {token_stride} down to "
                f"{FINAL_UPSCALE} ({int(math.log2(token_stride)) - 1} widths), got {list(decoder_widths)}"
            )
        self.stage_proj = nn.ModuleList(ConvLayer(c, head_width, 1, act=None) for c in stage_channels)
        # A context branch's maps join the stages at the token grid, before the fusion blocks, so the
        # head can weigh a field-wide measure against each token's local evidence. No batch norm: at
        # batch 1 it would rescale each patch's maps by their own spread and so erase the absolute
        # level (this field is medulla) that the maps are for.
        self.context_proj = (
            ConvLayer(context_channels, head_width, 1, norm=None, act=None) if context_channels else None
        )
        self.fuse = nn.Sequential(
            *(
                ResidualBlock(MBConv(head_width, head_width, expand_ratio=expand_ratio))
                for _ in range(head_depth)
            )
        )
        # Without stages the head starts at the coarsest skip: steps above it would have no input.
        self.input_stride = token_stride if stage_channels else max(skip_channels)
        in_channels = head_width if stage_channels else None
        self.strides = []
        self.steps = nn.ModuleList()
        for stride, width in zip(strides, decoder_widths, strict=True):
            if stride > self.input_stride:
                continue
            self.strides.append(stride)
            self.steps.append(DecoderStep(in_channels, skip_channels.get(stride), width))
            in_channels = width
        self.to_logits = nn.Sequential(
            nn.Conv2d(decoder_widths[-1], num_classes * FINAL_UPSCALE**2, 1), nn.PixelShuffle(FINAL_UPSCALE)
        )
        if tile_px % token_stride:
            raise ValueError(f"head tile {tile_px} px is not a multiple of the token stride {token_stride}")
        self.tile_px = tile_px
        self.halo_px = HEAD_HALO_TOKENS * token_stride
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the fusion blocks and each x2 step in backward instead of keeping their activations."""
        self.grad_checkpointing = enable

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs: dict[int, torch.Tensor] = {}
        if len(self.stage_proj):
            stages = [features[f"stage{i}"] for i in range(len(self.stage_proj))]
            x = self.stage_proj[0](stages[0])
            for i in range(1, len(stages)):
                x = x + F.interpolate(
                    self.stage_proj[i](stages[i]), size=x.shape[-2:], mode="bilinear", align_corners=False
                )
            if self.context_proj is not None:
                x = x + self.context_proj(features["context"])
            inputs[self.input_stride] = checkpoint_seq(self.grad_checkpointing, self.fuse, x)
        for stride in self.strides:
            if f"skip{stride}" in features:
                inputs[stride] = features[f"skip{stride}"]
        if self.training or not self.tile_px:
            return self.decode(inputs)
        return self.decode_tiled(inputs)

    def decode(self, inputs: dict[int, torch.Tensor]) -> torch.Tensor:
        """{stride: map} (the fused token map and the skips) -> full-resolution logits."""
        x = inputs.get(self.input_stride) if len(self.stage_proj) else None
        for stride, step in zip(self.strides, self.steps, strict=True):
            x = maybe_checkpoint(self.grad_checkpointing, step, x, inputs.get(stride))
        return self.to_logits(x)

    def decode_tiled(self, inputs: dict[int, torch.Tensor]) -> torch.Tensor:
        stride, reference = next(iter(inputs.items()))
        height, width = reference.shape[-2] * stride, reference.shape[-1] * stride
        logits = None
        for top in range(0, height, self.tile_px):
            for left in range(0, width, self.tile_px):
                bottom, right = min(top + self.tile_px, height), min(left + self.tile_px, width)
                # The margin is clipped at the image border, where the untiled decoder pads the same way.
                y0, x0 = max(top - self.halo_px, 0), max(left - self.halo_px, 0)
                y1, x1 = min(bottom + self.halo_px, height), min(right + self.halo_px, width)
                crops = {s: t[..., y0 // s : y1 // s, x0 // s : x1 // s] for s, t in inputs.items()}
                tile = self.decode(crops)
                if logits is None:
                    logits = tile.new_empty((*tile.shape[:2], height, width))
                logits[..., top:bottom, left:right] = tile[
                    ..., top - y0 : bottom - y0, left - x0 : right - x0
                ]
        return logits
