"""HoloHistoNet: windowed VQ tokenizer -> EfficientViT stages over the token grid -> full-resolution head.

Data flow for a B x 3 x H x W patch in [0, 1] (H, W padded to a multiple of the tokenizer window):

    [-1, 1] pixels --VQTokenizer (256-px windows)--> quantized tokens at 1/16 + encoder features at 1/2, 1/4, 1/8
    tokens --token_embed--> stage 1/16: MBConv + EfficientViT blocks (LiteMLA + MBConv)
           --MBConv stride 2--> stage 1/32: EfficientViT blocks ...
    head (head.py): stages projected, summed at 1/16, MBConvs; then x2 steps to 1/8, 1/4, 1/2, each
          adding the encoder feature of that stride; a pixel shuffle gives full-resolution logits.

Ablations (paper Table 3, plus the prototype's lesson that skips carry most of the signal on easy data):
`token_path` "tokenizer" | "linear" (a strided patch projection replaces the quantized tokens) | "none"
(the head sees the encoder skips only); `attention` "linear" (ReLU LiteMLA) | "softmax" (MHSA);
`skip_strides` () removes the skips; `context_branch` "orientation" adds the fixed texture-orientation
maps of orientation_context.py to the head's token-grid input (the design change of issue 15).
Modules a variant never runs are frozen, so DDP (which rejects parameters that get no gradient) and
optimisers see only live ones.

The net is built from a `HoloHistoConfig` (config.py; named sizes in presets.py, builders in build.py).
Training memory is a switch, as in timm: `set_grad_checkpointing()` recomputes the tokenizer's window
batches, each ViT block and the head's steps in backward instead of keeping their activations.
Pretrained tokenizer weights are an explicit step: `load_tokenizer(path)`; the builders call it when
`tokenizer_checkpoint` is set, the constructor only records the path.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from custom.networks.attention import EfficientViTBlock
from custom.networks.blocks import PAD_VALUE_WHITE, ConvLayer, MBConv, ResidualBlock, pad_to_multiple
from custom.networks.checkpointing import checkpoint_seq
from custom.networks.config import HoloHistoConfig
from custom.networks.head import SegmentationHead
from custom.networks.orientation_context import OrientationContext
from custom.networks.taming import load_taming_checkpoint
from custom.networks.tokenizer import VQTokenizer


class HoloHistoNet(nn.Module):
    """HoloHisto-4K segmentation net; see the module docstring for the data flow and the switches.

    Settings (`HoloHistoConfig`):
        in_chans: input channels (RGB).
        num_classes: logit channels (2 = background + glomerulus; more for multi-class).
        token_path: "tokenizer" | "linear" | "none".
        attention: "linear" (ReLU LiteMLA) | "softmax" (MHSA).
        tokenizer: the `TokenizerConfig`.
        freeze_tokenizer: no gradients into the tokenizer, which also stays in eval mode (no codebook
            changes), i.e. frozen means bit-identical weights; it runs under no_grad, so a training
            step keeps only the tokens and skips it hands on.
        tokenizer_checkpoint: a taming-format checkpoint for `load_tokenizer` (recorded, not loaded here).
        skip_strides: encoder strides the head takes features from.
        vit_widths, vit_depths: one entry per stage, at strides 16, 32, ...; depth = EfficientViT blocks.
        head_dim: channels per attention head.
        expand_ratio: MBConv expansion.
        aggregation_scales: LiteMLA multi-scale depthwise kernel sizes.
        head_width, head_depth: fusion width and MBConvs at the token stride.
        decoder_widths: widths of the x2 steps at strides 8, 4, 2.
        head_tile_px: eval-mode decoder tile in output pixels (0: untiled); the result does not depend on it.
        context_branch: "none" | "orientation" (fixed orientation-uniformity maps into the head).
    """

    network_name = "holohisto"

    def __init__(self, cfg: HoloHistoConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or HoloHistoConfig()
        self.token_path = cfg.token_path
        self.freeze_tokenizer = cfg.freeze_tokenizer
        self.tokenizer_checkpoint = cfg.tokenizer_checkpoint
        self.skip_strides = list(cfg.skip_strides)
        self.grad_checkpointing = False

        self.tokenizer = VQTokenizer(cfg.tokenizer)
        token_stride = self.tokenizer.token_stride
        widths = cfg.vit_widths
        self.token_embed = None
        if cfg.token_path == "tokenizer":
            self.token_embed = ConvLayer(cfg.tokenizer.code_dim, widths[0], 1, act=None)
        elif cfg.token_path == "linear":
            self.token_embed = ConvLayer(cfg.in_chans, widths[0], token_stride, stride=token_stride, act=None)
        self.stages = nn.ModuleList()
        if cfg.token_path != "none":
            for i, (width, depth) in enumerate(zip(widths, cfg.vit_depths, strict=True)):
                entry = (
                    ResidualBlock(MBConv(width, width, expand_ratio=cfg.expand_ratio))
                    if i == 0
                    else MBConv(widths[i - 1], width, stride=2, expand_ratio=cfg.expand_ratio)
                )
                blocks = [
                    EfficientViTBlock(
                        width, cfg.head_dim, cfg.expand_ratio, cfg.aggregation_scales, cfg.attention
                    )
                    for _ in range(depth)
                ]
                self.stages.append(nn.Sequential(entry, *blocks))
        self.context = (
            OrientationContext(cell_px=token_stride) if cfg.context_branch == "orientation" else None
        )
        self.head = SegmentationHead(
            stage_channels=[widths[i] for i in range(len(self.stages))],
            skip_channels=dict(
                zip(self.skip_strides, self.tokenizer.skip_channels(self.skip_strides), strict=True)
            ),
            token_stride=token_stride,
            head_width=cfg.head_width,
            head_depth=cfg.head_depth if len(self.stages) else 0,
            decoder_widths=cfg.decoder_widths,
            num_classes=cfg.num_classes,
            expand_ratio=cfg.expand_ratio,
            tile_px=cfg.head_tile_px,
            context_channels=self.context.out_channels if self.context is not None else 0,
        )
        # The grid must split into windows, and every stage must halve it exactly.
        self.size_multiple = math.lcm(
            self.tokenizer.window_px, token_stride * 2 ** max(len(self.stages) - 1, 0)
        )

        if cfg.token_path != "tokenizer":
            unused = (
                self.tokenizer.modules_unused_without_tokens(self.skip_strides)
                if self.skip_strides
                else [self.tokenizer]
            )
            for module in unused:
                module.requires_grad_(False)
        if cfg.freeze_tokenizer:
            self.tokenizer.requires_grad_(False)
            self.tokenizer.eval()
        self._aux_loss: torch.Tensor | None = None

    @property
    def config(self) -> dict[str, Any]:
        """The flat record of the config this net was built from (what a checkpoint's network_config holds)."""
        return self.cfg.to_dict()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm-style memory switch: recompute activations in backward instead of keeping them.

        Covers the tokenizer's window batches (when it trains), every ViT block and the head's fusion and
        x2 steps. Gradients and batch-norm statistics are those of the plain step; the cost is one more
        forward of the checkpointed parts (benchmarks/RESULTS.md). Acts only in training with autograd on.
        """
        self.grad_checkpointing = enable
        self.tokenizer.set_grad_checkpointing(enable)
        self.head.set_grad_checkpointing(enable)

    def train(self, mode: bool = True) -> HoloHistoNet:
        super().train(mode)
        if self.freeze_tokenizer:
            self.tokenizer.eval()
        return self

    def load_tokenizer(self, path: str | Path) -> None:
        """Load taming-format tokenizer weights (strict keys and shapes; ConfigError otherwise)."""
        load_taming_checkpoint(self.tokenizer, path)

    @torch.no_grad()
    def init_codebook(self, images: torch.Tensor) -> None:
        """k-means the codebook on the tokenizer's outputs for `images` (B x 3 x H x W in [0, 1]).

        For a frozen tokenizer that should still have a data-fitted codebook (e.g. a random encoder).
        """
        vectors = self.tokenizer.encode(
            pad_to_multiple(images * 2 - 1, self.tokenizer.window_px, PAD_VALUE_WHITE)
        )
        self.tokenizer.quantize.init_codebook(vectors.permute(0, 2, 3, 1).reshape(-1, vectors.shape[1]))

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: B x 3 x H x W in [0, 1], H and W multiples of `size_multiple` -> {"stage<i>", "skip<stride>"}
        and, with a context branch, "context" (its maps at the token stride)."""
        x = x * 2 - 1
        features: dict[str, torch.Tensor] = {}
        skips: list[torch.Tensor] = []
        tokens = None
        self._aux_loss = None
        # A frozen tokenizer records no graph: only its outputs (tokens, skips) outlive it.
        frozen = torch.no_grad() if self.freeze_tokenizer else contextlib.nullcontext()
        with frozen:
            if self.token_path == "tokenizer":
                tokenized = self.tokenizer(x, self.skip_strides)
                tokens, skips = tokenized.tokens, tokenized.skips
                self._aux_loss = tokenized.loss
            elif self.skip_strides:
                skips = self.tokenizer.encode_skips(x, self.skip_strides)
        if self.token_path == "linear":
            tokens = x
        if self.token_embed is not None:
            h = self.token_embed(tokens)
            for i, stage in enumerate(self.stages):
                h = checkpoint_seq(self.grad_checkpointing, stage, h)
                features[f"stage{i}"] = h
        for stride, skip in zip(self.skip_strides, skips, strict=True):
            features[f"skip{stride}"] = skip
        if self.context is not None:
            features["context"] = self.context(x)
        return features

    def forward_head(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1], any H x W -> logits B x num_classes x H x W."""
        # MONAI hands MetaTensors in; metadata tracking through every layer only costs time here.
        x = x.as_subclass(torch.Tensor)
        height, width = x.shape[-2:]
        # Pad on the [0, 1] scale with white (1.0), which maps to PAD_VALUE_WHITE on the net's scale.
        padded = pad_to_multiple(x, self.size_multiple, (PAD_VALUE_WHITE + 1) / 2)
        logits = self.forward_head(self.forward_features(padded))
        return logits[..., :height, :width]

    def aux_loss(self) -> torch.Tensor:
        """Codebook + commitment loss of the last forward, for a loss wrapper to add; 0 when nothing trains it."""
        if self._aux_loss is None or self.freeze_tokenizer:
            return torch.zeros((), device=self.tokenizer.quant_conv.weight.device)
        return self._aux_loss

    def codebook_usage(self) -> dict[str, float]:
        """Perplexity and used/dead code counts of the last forward ({} without a token path through codes)."""
        return self.tokenizer.quantize.usage() if self.token_path == "tokenizer" else {}
