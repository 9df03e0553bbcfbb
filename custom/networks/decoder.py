"""The VQGAN decoder and the training-time autoencoder (tokenizer + decoder); used only to train the tokenizer.

`Decoder` reproduces taming-transformers' `Decoder` module tree (conv_in, mid.block_1/attn_1/block_2,
up[i].block[j], up[i].attn[j], up[i].upsample, norm_out, conv_out), so with `stem_stride=1` the decoder
of a taming VQModel checkpoint loads key for key. It mirrors the encoder it is built for: the tokenizer's
`stem_stride=2` (the first downsampling folded into conv_in) is mirrored by a conv_out that predicts the
2 x 2 sub-pixels of each half-resolution position and a pixel shuffle, so neither end of the CPU-sized
autoencoder runs a many-channel conv at full resolution.

It is built from the encoder's own `VQGANConfig` (taming's ddconfig, shared by both ends).

`VQAutoencoder` = `VQTokenizer` -> post_quant_conv -> `Decoder`. It decodes each tokenizer window on its
own, as the tokenizer encoded it: what the segmentation net later receives is exactly what the
reconstruction was trained on. Its checkpoints use taming's VQModel layout (`taming_state_dict`), so a
segmentation net loads the tokenizer part of them with `load_taming_checkpoint`, and a taming VQModel
checkpoint initialises the whole autoencoder (`load_taming_autoencoder`) to fine-tune the ImageNet VQGAN
on slides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from custom.errors import ConfigError
from custom.networks.blocks import taming_norm
from custom.networks.config import TokenizerConfig, VQGANConfig
from custom.networks.encoder import MidBlock, ResnetStack
from custom.networks.presets import TOKENIZER_PRESETS
from custom.networks.taming import _taming_keys, read_state_dict, state_dict_mismatch
from custom.networks.tokenizer import VQTokenizer

# A taming VQModel's decoder-side keys: everything the autoencoder adds to the tokenizer.
DECODER_PREFIXES = ("decoder.", "post_quant_conv.")
UPSAMPLE_FACTOR = 2


class Upsample(nn.Module):
    """taming's x2 nearest-neighbour upsampling followed by a 3x3 conv (key `conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=float(UPSAMPLE_FACTOR), mode="nearest"))


class Decoder(nn.Module):
    """taming's VQGAN Decoder for an encoder's config; z (B x z_channels x h x w) -> image on the [-1, 1] scale.

    `Decoder(cfg)` mirrors `Encoder(cfg)`, as taming builds both from one ddconfig; out_channels defaults
    to the encoder's input channels.
    """

    def __init__(self, cfg: VQGANConfig, out_channels: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.out_channels = cfg.in_channels if out_channels is None else out_channels
        ch, ch_mult, stem_stride, norm_groups = cfg.ch, cfg.ch_mult, cfg.stem_stride, cfg.norm_groups
        levels = len(ch_mult)
        block_in = cfg.level_channels[-1]
        current_res = cfg.resolution // stem_stride // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = MidBlock(block_in, norm_groups)
        # Built coarsest first, stored finest first: up[i] is the level of encoder level i, as in taming.
        # A decoder level has num_res_blocks + 1 ResnetBlocks, taming's count.
        up: list[ResnetStack] = []
        for i in reversed(range(levels)):
            block_out = ch * ch_mult[i]
            level = ResnetStack(
                block_in, block_out, cfg.num_res_blocks + 1, current_res in cfg.attn_resolutions, norm_groups
            )
            level.upsample = Upsample(block_out) if i != 0 else None
            up.insert(0, level)
            block_in = block_out
            if i != 0:
                current_res *= UPSAMPLE_FACTOR
        self.up = nn.ModuleList(up)
        self.norm_out = taming_norm(block_in, norm_groups)
        # The stride-2 stem is undone by predicting stem_stride^2 sub-pixels per position (no full-res conv).
        self.conv_out = nn.Conv2d(block_in, self.out_channels * stem_stride**2, 3, 1, 1)
        self.unfold_stem = nn.PixelShuffle(stem_stride) if stem_stride > 1 else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.unfold_stem(self.conv_out(F.silu(self.norm_out(h))))


class VQAutoencoder(nn.Module):
    """Tokenizer + decoder for training the tokenizer: images in [0, 1] -> reconstructions on the same scale.

    Args:
        tokenizer: the tokenizer's config (e.g. `presets.full_tokenizer()`).
        decoder: decoder settings overriding the ones mirrored from the tokenizer's VQGAN config
            (its keys, plus out_channels).

    In training mode the reconstruction is unclamped (clamping would stop gradients at saturated pixels);
    in eval mode it is clamped to [0, 1] so it is an image. `aux_loss()` is the quantizer's codebook +
    commitment loss of the last forward.
    """

    def __init__(self, tokenizer: TokenizerConfig, decoder: dict[str, Any] | None = None):
        super().__init__()
        self.tokenizer = VQTokenizer(tokenizer)
        overrides = dict(decoder or {})
        out_channels = overrides.pop("out_channels", None)
        decoder_cfg = tokenizer.vqgan.updated(overrides, owner="decoder")
        self.post_quant_conv = nn.Conv2d(tokenizer.code_dim, decoder_cfg.z_channels, 1)
        self.decoder = Decoder(decoder_cfg, out_channels)
        self.window_tokens = self.tokenizer.window_px // self.tokenizer.token_stride
        self._aux_loss: torch.Tensor | None = None

    @property
    def decoder_config(self) -> dict[str, Any]:
        """The decoder's record (vqgan.pt's decoder_config), derived from the config it was built from."""
        mirrored = {k: v for k, v in self.decoder.cfg.to_dict().items() if k != "in_channels"}
        return {"out_channels": self.decoder.out_channels, **mirrored}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The tokenizer's window checkpointing (the decoder, run per window at 512 px, is not checkpointed)."""
        self.tokenizer.set_grad_checkpointing(enable)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where VQGAN's adaptive adversarial weight compares gradients."""
        return self.decoder.conv_out.weight

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1], H and W multiples of the tokenizer window -> reconstruction B x 3 x H x W."""
        x = images.as_subclass(torch.Tensor) * 2 - 1
        window = self.tokenizer.window_px
        if x.shape[-2] % window or x.shape[-1] % window:
            raise ValueError(
                f"autoencoder input {list(x.shape[-2:])} px is not a multiple of the tokenizer window {window} px"
            )
        tokenized = self.tokenizer(x)
        self._aux_loss = tokenized.loss
        reconstruction = (self.decode(tokenized.tokens) + 1) / 2
        return reconstruction if self.training else reconstruction.clamp(0.0, 1.0)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Quantized tokens B x D x h x w -> image on the [-1, 1] scale, one tokenizer window at a time."""
        rows, cols = tokens.shape[-2] // self.window_tokens, tokens.shape[-1] // self.window_tokens
        windows = rearrange(
            tokens, "b d (r h) (c w) -> (b r c) d h w", h=self.window_tokens, w=self.window_tokens
        )
        pixels = self.decoder(self.post_quant_conv(windows))
        return rearrange(pixels, "(b r c) k h w -> b k (r h) (c w)", r=rows, c=cols)

    def aux_loss(self) -> torch.Tensor:
        if self._aux_loss is None:
            return torch.zeros((), device=self.last_layer.device)
        return self._aux_loss

    def codebook_usage(self) -> dict[str, float]:
        return self.tokenizer.quantize.usage()

    def taming_state_dict(self) -> dict[str, torch.Tensor]:
        """All weights keyed like a taming VQModel (encoder.*, quant_conv.*, quantize.*, post_quant_conv.*, decoder.*)."""
        return {
            **self.tokenizer.state_dict(),
            **{f"post_quant_conv.{k}": v for k, v in self.post_quant_conv.state_dict().items()},
            **{f"decoder.{k}": v for k, v in self.decoder.state_dict().items()},
        }

    def load_taming_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict inverse of `taming_state_dict`; ConfigError naming missing, unexpected or misshapen keys.

        A taming VQModel's own extras (loss.*, the discriminator and LPIPS of its training loss) are ignored.
        """
        state = {k: v for k, v in state.items() if not k.startswith("loss.")}
        # taming checkpoints have no `quantize.initialized`; they are trained codebooks by definition.
        optional = frozenset({"quantize.initialized"})
        problems = state_dict_mismatch(state, self.taming_state_dict(), "autoencoder", optional)
        if problems:
            raise ConfigError(
                f"{source}: does not fit this autoencoder ({problems}); tokenizer "
                f"{self.tokenizer.config}, decoder {self.decoder_config}"
            )
        self.tokenizer.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith(DECODER_PREFIXES)}, strict=False
        )
        self.post_quant_conv.load_state_dict(_strip(state, "post_quant_conv."))
        self.decoder.load_state_dict(_strip(state, "decoder."))
        self.tokenizer.quantize.initialized.fill_(True)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def tokenizer_state_dict(autoencoder: VQAutoencoder) -> dict[str, torch.Tensor]:
    """The tokenizer alone, in the keys `load_taming_checkpoint` takes (encoder.*, quant_conv.*, codebook)."""
    return _taming_keys(autoencoder.tokenizer.state_dict())


def load_taming_autoencoder(autoencoder: VQAutoencoder, path: str | Path) -> None:
    """Initialise tokenizer and decoder from a taming VQModel `.ckpt` (or one of ours), read weights-only."""
    autoencoder.load_taming_state_dict(read_state_dict(path, "autoencoder"), source=str(path))


def vq_autoencoder(
    preset: str = "full",
    tokenizer: dict[str, Any] | None = None,
    decoder: dict[str, Any] | None = None,
    init_checkpoint: str | None = None,
    grad_checkpointing: bool = False,
) -> VQAutoencoder:
    """The autoencoder of a segmentation preset's tokenizer ("full" | "fast" | "tiny"), plus overrides.

    The tokenizer it trains then has exactly the shape that preset's segmentation net loads.
    `init_checkpoint`: a taming VQModel checkpoint (or an earlier autoencoder) to start from.
    """
    if preset not in TOKENIZER_PRESETS:
        raise ConfigError(f"unknown tokenizer preset {preset!r}; expected one of {sorted(TOKENIZER_PRESETS)}")
    model = VQAutoencoder(TOKENIZER_PRESETS[preset]().updated(tokenizer or {}), decoder)
    model.set_grad_checkpointing(grad_checkpointing)
    if init_checkpoint:
        load_taming_autoencoder(model, init_checkpoint)
    return model
