"""Networks: the HoloHisto tokenizer + linear-attention ViT + full-resolution head, and tile baselines.

One idea per file, in the order a patch flows:
`config` (the taming-style configs: every network is built from one) and `presets` (the named sizes,
one builder function each, and their registry); `blocks` (conv building blocks), `checkpointing`
(activation checkpointing that leaves batch-norm statistics alone), `attention` (LiteMLA, EfficientViT
block); `encoder` (taming's VQGAN encoder), `quantizer`, `tokenizer` (windowed encoder + quantizer),
`taming` (loading taming checkpoints); `head` (stage fusion and x2 steps), `holohisto` (the net);
`build` (`holohisto_full/fast/tiny`, `build_network`, `network_config`); `decoder` (the VQGAN decoder,
only for training the tokenizer); `baselines` (MONAI's UNet and SwinUNETR-V2 behind the same input
contract). Export: `torch.jit.trace` (see tests/test_networks.py); `torch.jit.script` does not compile
these modules.
"""

from custom.networks.attention import EfficientViTBlock, LiteMLA, relu_linear_attention, softmax_attention
from custom.networks.baselines import SwinUNETRBaseline, UNetBaseline
from custom.networks.build import (
    NETWORKS,
    build_network,
    holohisto_fast,
    holohisto_full,
    holohisto_tiny,
    network_config,
)
from custom.networks.config import HoloHistoConfig, TokenizerConfig, VQGANConfig
from custom.networks.holohisto import HoloHistoNet
from custom.networks.presets import PRESETS, TOKENIZER_PRESETS
from custom.networks.quantizer import VectorQuantizer, perplexity
from custom.networks.taming import load_taming_checkpoint
from custom.networks.tokenizer import VQTokenizer

__all__ = [
    "NETWORKS",
    "PRESETS",
    "TOKENIZER_PRESETS",
    "EfficientViTBlock",
    "HoloHistoConfig",
    "HoloHistoNet",
    "LiteMLA",
    "SwinUNETRBaseline",
    "TokenizerConfig",
    "UNetBaseline",
    "VQGANConfig",
    "VQTokenizer",
    "VectorQuantizer",
    "build_network",
    "holohisto_fast",
    "holohisto_full",
    "holohisto_tiny",
    "load_taming_checkpoint",
    "network_config",
    "perplexity",
    "relu_linear_attention",
    "softmax_attention",
]
