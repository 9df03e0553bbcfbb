"""The named sizes: one small builder function per preset, every number of a size in it, and a registry.

As segment-anything's build_sam.py and timm's model factories do: `PRESETS[name]()` is a fresh config
(`HoloHistoConfig`, config.py) that `build.py` turns into a network; `TOKENIZER_PRESETS` hold the
tokenizer (and, mirrored, the VQGAN decoder) of each.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from custom.networks.config import HoloHistoConfig, TokenizerConfig, VQGANConfig


def full_tokenizer() -> TokenizerConfig:
    """The paper's tokenizer: taming-transformers' vqgan_imagenet_f16_1024 (loads its checkpoint as is),
    plus codebook care that acts only while the tokenizer trains (k-means init also not after a load)."""
    return TokenizerConfig(
        vqgan=VQGANConfig(
            ch=128,
            ch_mult=(1, 1, 2, 2, 4),
            num_res_blocks=2,
            attn_resolutions=(16,),
            resolution=256,
            z_channels=256,
            stem_stride=1,
            norm_groups=32,
        ),
        num_codes=1024,
        code_dim=256,
        beta=0.25,
        kmeans_init=True,
        restart_every=100,
        window_batch=16,
    )


def fast_tokenizer() -> TokenizerConfig:
    """The full tokenizer without its full-resolution level: conv_in has stride 2 (as the tiny one).

    Same token grid (f=16), codebook and skip widths at strides 2, 4, 8; the 128-channel ResNet level at
    full resolution, 97.5 % of the full net's FLOPs with the next level, is gone. It no longer loads a
    taming checkpoint.
    """
    full = full_tokenizer()
    return dataclasses.replace(
        full, vqgan=dataclasses.replace(full.vqgan, ch_mult=(1, 2, 2, 4), stem_stride=2)
    )


def tiny_tokenizer() -> TokenizerConfig:
    """CPU-sized: the fast tokenizer's shape (f=16 windows of 256 px, the first downsampling folded into
    conv_in, so nothing runs at full resolution) at 1/8 of its width, one res block, 256 codes; a restart
    every 20 steps because the prototype's codebook collapsed."""
    fast = fast_tokenizer()
    return dataclasses.replace(
        fast,
        vqgan=dataclasses.replace(fast.vqgan, ch=16, num_res_blocks=1, z_channels=64, norm_groups=8),
        num_codes=256,
        code_dim=32,
        restart_every=20,
    )


def full() -> HoloHistoConfig:
    """The paper's size. EfficientViT-B2's stages 3-4 (widths 192/384, 4 and 6 blocks, head_dim 32) and
    its segmentation head (width 96, 3 MBConvs): the tokenizer replaces B2's stem and stages 1-2, which
    end at the same 1/16."""
    return HoloHistoConfig(
        tokenizer=full_tokenizer(),
        vit_widths=(192, 384),
        vit_depths=(4, 6),
        head_dim=32,
        head_width=96,
        head_depth=3,
        decoder_widths=(64, 48, 32),
    )


def fast() -> HoloHistoConfig:
    """The full net with the fast tokenizer: same ViT, head and skips."""
    return dataclasses.replace(full(), tokenizer=fast_tokenizer())


def tiny() -> HoloHistoConfig:
    """CPU-sized net (0.58 M parameters): trains on 2 cores; cannot load a taming checkpoint."""
    return HoloHistoConfig(
        tokenizer=tiny_tokenizer(),
        vit_widths=(48, 64),
        vit_depths=(1, 2),
        head_dim=16,
        head_width=32,
        head_depth=1,
        decoder_widths=(32, 16, 16),
    )


# {"name": "holohisto", "preset": "tiny", ...overrides} in a config is PRESETS["tiny"]() with overrides.
PRESETS: dict[str, Callable[[], HoloHistoConfig]] = {"full": full, "fast": fast, "tiny": tiny}
TOKENIZER_PRESETS: dict[str, Callable[[], TokenizerConfig]] = {
    "full": full_tokenizer,
    "fast": fast_tokenizer,
    "tiny": tiny_tokenizer,
}
