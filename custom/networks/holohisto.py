"""HoloHistoNet: windowed VQ tokenizer -> EfficientViT stages over the token grid -> full-resolution head.

Data flow for a B x 3 x H x W patch in [0, 1] (H, W padded to a multiple of the tokenizer window):

    [-1, 1] pixels --VQTokenizer (256-px windows)--> quantized tokens at 1/16 + encoder features at 1/2, 1/4, 1/8
    tokens --token_embed--> stage 1/16: MBConv + EfficientViT blocks (LiteMLA + MBConv)
           --MBConv stride 2--> stage 1/32: EfficientViT blocks ...
    head: stages projected, summed at 1/16, MBConvs; then x2 steps to 1/8, 1/4, 1/2, each adding the
          encoder feature of that stride (the skips keep boundaries sharp); 1x1 conv to 4 * num_classes
          channels and a pixel shuffle give full-resolution logits without any full-resolution conv.

Ablations (paper Table 3, plus the prototype's lesson that skips carry most of the signal on easy data):
`token_path` "tokenizer" | "linear" (a strided patch projection replaces the quantized tokens) | "none"
(the head sees the encoder skips only); `attention` "linear" (ReLU LiteMLA) | "softmax" (MHSA);
`skip_strides` () removes the skips. Modules a variant never runs are frozen, so DDP (which rejects
parameters that get no gradient) and optimisers see only live ones.

Pretrained tokenizer weights are an explicit step: `load_tokenizer(path)`; the factories and
`build_network` call it when `tokenizer_checkpoint` is set, the constructor only records the path.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from custom.errors import ConfigError
from custom.networks.attention import ATTENTION_KERNELS, EfficientViTBlock
from custom.networks.baselines import SwinUNETRBaseline, UNetBaseline
from custom.networks.blocks import PAD_VALUE_WHITE, ConvLayer, DSConv, MBConv, ResidualBlock, pad_to_multiple
from custom.networks.tokenizer import VQTokenizer, load_taming_checkpoint

TOKEN_PATHS = ("tokenizer", "linear", "none")
# The final x2 step: a 1x1 conv predicts the 2 x 2 sub-pixels of each half-resolution position.
FINAL_UPSCALE = 2
# Margin of a head tile, in tokens: the decoder's receptive field below the token grid (bilinear x2
# steps and 3x3 depthwise convs at 1/8, 1/4, 1/2) spans under 3 tokens.
HEAD_HALO_TOKENS = 4

# The paper's tokenizer: taming-transformers' vqgan_imagenet_f16_1024 (loads its checkpoint as is),
# plus codebook care that acts only while the tokenizer trains (k-means init also not after a load).
FULL_TOKENIZER: dict[str, Any] = {
    "ch": 128,
    "ch_mult": [1, 1, 2, 2, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [16],
    "resolution": 256,
    "z_channels": 256,
    "num_codes": 1024,
    "code_dim": 256,
    "beta": 0.25,
    "stem_stride": 1,
    "norm_groups": 32,
    "kmeans_init": True,
    "restart_every": 100,
    "window_batch": 16,
    "checkpoint_windows": True,  # a trainable 4K tokenizer does not fit an H200 otherwise
}

# CPU-sized: f=16 windows of 256 px with the first downsampling folded into conv_in (so nothing runs at
# full resolution), 256 codes; a restart every 20 steps because the prototype's codebook collapsed.
TINY_TOKENIZER: dict[str, Any] = {
    "ch": 16,
    "ch_mult": [1, 2, 2, 4],
    "num_res_blocks": 1,
    "attn_resolutions": [16],
    "resolution": 256,
    "z_channels": 64,
    "num_codes": 256,
    "code_dim": 32,
    "beta": 0.25,
    "stem_stride": 2,
    "norm_groups": 8,
    "kmeans_init": True,
    "restart_every": 20,
    "window_batch": 16,
}


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
    ):
        super().__init__()
        strides = [token_stride // 2 ** (i + 1) for i in range(len(decoder_widths))]
        if not strides or strides[-1] != FINAL_UPSCALE:
            raise ValueError(
                f"decoder_widths needs one width per x2 step from the token stride {token_stride} down to "
                f"{FINAL_UPSCALE} ({int(math.log2(token_stride)) - 1} widths), got {list(decoder_widths)}"
            )
        self.stage_proj = nn.ModuleList(ConvLayer(c, head_width, 1, act=None) for c in stage_channels)
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

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs: dict[int, torch.Tensor] = {}
        if len(self.stage_proj):
            stages = [features[f"stage{i}"] for i in range(len(self.stage_proj))]
            x = self.stage_proj[0](stages[0])
            for i in range(1, len(stages)):
                x = x + F.interpolate(
                    self.stage_proj[i](stages[i]), size=x.shape[-2:], mode="bilinear", align_corners=False
                )
            inputs[self.input_stride] = self.fuse(x)
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
            x = step(x, inputs.get(stride))
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


class HoloHistoNet(nn.Module):
    """HoloHisto-4K segmentation net; see the module docstring for the data flow and the switches.

    Args:
        in_chans: input channels (RGB).
        num_classes: logit channels (2 = background + glomerulus; more for multi-class).
        token_path: "tokenizer" | "linear" | "none".
        attention: "linear" (ReLU LiteMLA) | "softmax" (MHSA).
        tokenizer: `VQTokenizer` arguments, merged over FULL_TOKENIZER.
        freeze_tokenizer: no gradients into the tokenizer, which also stays in eval mode (no codebook
            changes), i.e. frozen means bit-identical weights.
        tokenizer_checkpoint: a taming-format checkpoint for `load_tokenizer` (recorded, not loaded here).
        skip_strides: encoder strides the head takes features from.
        vit_widths, vit_depths: one entry per stage, at strides 16, 32, ...; depth = EfficientViT blocks.
        head_dim: channels per attention head.
        expand_ratio: MBConv expansion.
        aggregation_scales: LiteMLA multi-scale depthwise kernel sizes.
        head_width, head_depth: fusion width and MBConvs at the token stride.
        decoder_widths: widths of the x2 steps at strides 8, 4, 2.
        head_tile_px: eval-mode decoder tile in output pixels (0: untiled); the result does not depend on it.
    """

    network_name = "holohisto"

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 2,
        token_path: str = "tokenizer",
        attention: str = "linear",
        tokenizer: dict[str, Any] | None = None,
        freeze_tokenizer: bool = False,
        tokenizer_checkpoint: str | None = None,
        skip_strides: Sequence[int] = (2, 4, 8),
        vit_widths: Sequence[int] = (192, 384),
        vit_depths: Sequence[int] = (4, 6),
        head_dim: int = 32,
        expand_ratio: float = 4,
        aggregation_scales: Sequence[int] = (5,),
        head_width: int = 96,
        head_depth: int = 3,
        decoder_widths: Sequence[int] = (64, 48, 32),
        head_tile_px: int = 1024,
    ):
        super().__init__()
        if token_path not in TOKEN_PATHS:
            raise ValueError(f"token_path must be one of {TOKEN_PATHS}, got {token_path!r}")
        if attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
        if token_path == "none" and not skip_strides:
            raise ValueError("token_path='none' with no skip_strides leaves the head without any input")
        if len(vit_widths) != len(vit_depths):
            raise ValueError(
                f"vit_widths {list(vit_widths)} and vit_depths {list(vit_depths)} differ in length"
            )
        if not isinstance(freeze_tokenizer, bool):
            # a command-line "false" arrives as a (truthy) string: refuse it rather than freeze
            raise ConfigError(f"freeze_tokenizer must be true or false, got {freeze_tokenizer!r}")
        self.token_path = token_path
        self.freeze_tokenizer = freeze_tokenizer
        self.tokenizer_checkpoint = tokenizer_checkpoint
        self.skip_strides = sorted(skip_strides)

        self.tokenizer = VQTokenizer(in_channels=in_chans, **{**FULL_TOKENIZER, **(tokenizer or {})})
        token_stride = self.tokenizer.token_stride
        self.token_embed = None
        if token_path == "tokenizer":
            self.token_embed = ConvLayer(self.tokenizer.config["code_dim"], vit_widths[0], 1, act=None)
        elif token_path == "linear":
            self.token_embed = ConvLayer(in_chans, vit_widths[0], token_stride, stride=token_stride, act=None)
        self.stages = nn.ModuleList()
        if token_path != "none":
            for i, (width, depth) in enumerate(zip(vit_widths, vit_depths, strict=True)):
                entry = (
                    ResidualBlock(MBConv(width, width, expand_ratio=expand_ratio))
                    if i == 0
                    else MBConv(vit_widths[i - 1], width, stride=2, expand_ratio=expand_ratio)
                )
                blocks = [
                    EfficientViTBlock(width, head_dim, expand_ratio, aggregation_scales, attention)
                    for _ in range(depth)
                ]
                self.stages.append(nn.Sequential(entry, *blocks))
        self.head = SegmentationHead(
            stage_channels=[vit_widths[i] for i in range(len(self.stages))],
            skip_channels=dict(
                zip(self.skip_strides, self.tokenizer.skip_channels(self.skip_strides), strict=True)
            ),
            token_stride=token_stride,
            head_width=head_width,
            head_depth=head_depth if len(self.stages) else 0,
            decoder_widths=decoder_widths,
            num_classes=num_classes,
            expand_ratio=expand_ratio,
            tile_px=head_tile_px,
        )
        # The grid must split into windows, and every stage must halve it exactly.
        self.size_multiple = math.lcm(
            self.tokenizer.window_px, token_stride * 2 ** max(len(self.stages) - 1, 0)
        )

        if token_path != "tokenizer":
            unused = (
                self.tokenizer.modules_unused_without_tokens(self.skip_strides)
                if self.skip_strides
                else [self.tokenizer]
            )
            for module in unused:
                module.requires_grad_(False)
        if freeze_tokenizer:
            self.tokenizer.requires_grad_(False)
            self.tokenizer.eval()
        self._aux_loss: torch.Tensor | None = None

        tokenizer_config = {k: v for k, v in self.tokenizer.config.items() if k != "in_channels"}
        self.config: dict[str, Any] = {
            "in_chans": in_chans,
            "num_classes": num_classes,
            "token_path": token_path,
            "attention": attention,
            "tokenizer": tokenizer_config,
            "freeze_tokenizer": freeze_tokenizer,
            "tokenizer_checkpoint": None if tokenizer_checkpoint is None else str(tokenizer_checkpoint),
            "skip_strides": list(self.skip_strides),
            "vit_widths": list(vit_widths),
            "vit_depths": list(vit_depths),
            "head_dim": head_dim,
            "expand_ratio": expand_ratio,
            "aggregation_scales": list(aggregation_scales),
            "head_width": head_width,
            "head_depth": head_depth,
            "decoder_widths": list(decoder_widths),
            "head_tile_px": head_tile_px,
        }

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
        """x: B x 3 x H x W in [0, 1] with H, W multiples of `size_multiple` -> {"stage<i>", "skip<stride>"}."""
        x = x * 2 - 1
        features: dict[str, torch.Tensor] = {}
        skips: list[torch.Tensor] = []
        tokens = None
        self._aux_loss = None
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
                h = stage(h)
                features[f"stage{i}"] = h
        for stride, skip in zip(self.skip_strides, skips, strict=True):
            features[f"skip{stride}"] = skip
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


def _create(config: dict[str, Any], load_tokenizer_checkpoint: bool = True) -> HoloHistoNet:
    model = HoloHistoNet(**config)
    if load_tokenizer_checkpoint and model.tokenizer_checkpoint:
        model.load_tokenizer(model.tokenizer_checkpoint)
    return model


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(base)
    tokenizer = {**config.pop("tokenizer", {}), **overrides.pop("tokenizer", {})}
    return {**config, **overrides, "tokenizer": tokenizer}


# EfficientViT-B2's stages 3-4 (widths 192/384, 4 and 6 blocks, head_dim 32) and its segmentation head
# (width 96, 3 MBConvs): the tokenizer replaces B2's stem and stages 1-2, which end at the same 1/16.
FULL: dict[str, Any] = {
    "tokenizer": FULL_TOKENIZER,
    "vit_widths": [192, 384],
    "vit_depths": [4, 6],
    "head_dim": 32,
    "head_width": 96,
    "head_depth": 3,
    "decoder_widths": [64, 48, 32],
}

TINY: dict[str, Any] = {
    "tokenizer": TINY_TOKENIZER,
    "vit_widths": [48, 64],
    "vit_depths": [1, 2],
    "head_dim": 16,
    "head_width": 32,
    "head_depth": 1,
    "decoder_widths": [32, 16, 16],
}


def holohisto_full(**overrides: Any) -> HoloHistoNet:
    """The paper's size (taming f16/1024 tokenizer, EfficientViT-B2-class ViT); meant for a GPU."""
    return _create(_merged(FULL, overrides))


def holohisto_tiny(**overrides: Any) -> HoloHistoNet:
    """CPU-sized net (0.58 M parameters): trains on 2 cores; cannot load a taming checkpoint."""
    return _create(_merged(TINY, overrides))


# Named sizes for configs: {"name": "holohisto", "preset": "tiny", ...overrides} is holohisto_tiny(...).
PRESETS: dict[str, dict[str, Any]] = {"full": FULL, "tiny": TINY}

NETWORKS: dict[str, type[nn.Module]] = {
    HoloHistoNet.network_name: HoloHistoNet,
    UNetBaseline.network_name: UNetBaseline,
    SwinUNETRBaseline.network_name: SwinUNETRBaseline,
}


def network_config(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable record of the exact constructor arguments ({"name": ..., **args})."""
    name = getattr(model, "network_name", None)
    if name not in NETWORKS:
        raise ConfigError(f"{type(model).__name__} is not a network build_network knows ({sorted(NETWORKS)})")
    return {"name": name, **copy.deepcopy(model.config)}


def build_network(config: dict[str, Any], load_tokenizer_checkpoint: bool = True) -> nn.Module:
    """Build a net from a config: `network_config` output (as stored in checkpoints), or for HoloHisto a
    `preset` ("full" | "tiny") plus overrides, e.g. {"name": "holohisto", "preset": "tiny", "num_classes": 3}.

    A HoloHisto `tokenizer_checkpoint` in the config is loaded unless load_tokenizer_checkpoint=False,
    which is what restoring a full checkpoint wants (its state dict replaces those weights anyway).
    """
    args = dict(config)
    name = args.pop("name", HoloHistoNet.network_name)
    if name not in NETWORKS:
        raise ConfigError(f"unknown network {name!r}; expected one of {sorted(NETWORKS)}")
    try:
        if name != HoloHistoNet.network_name:
            return NETWORKS[name](**args)
        preset = args.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ConfigError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
            args = _merged(PRESETS[preset], args)
        return _create(args, load_tokenizer_checkpoint)
    except TypeError as err:
        raise ConfigError(f"network {name!r}: {err}") from err
