"""Networks: the HoloHisto tokenizer + linear-attention ViT + full-resolution head, and tile baselines.

`blocks` (conv building blocks) -> `attention` (LiteMLA, EfficientViT block) -> `tokenizer` (VQGAN
encoder, vector quantizer, windowing, taming checkpoint loading) -> `holohisto` (the net, its sizes,
`build_network` / `network_config`); `baselines` holds MONAI's UNet and SwinUNETR-V2 behind the same
input contract. Export: `torch.jit.trace` (see tests/test_networks.py); `torch.jit.script` does not
compile these modules.
"""

from custom.networks.attention import EfficientViTBlock, LiteMLA, relu_linear_attention, softmax_attention
from custom.networks.baselines import SwinUNETRBaseline, UNetBaseline
from custom.networks.holohisto import (
    HoloHistoNet,
    build_network,
    holohisto_full,
    holohisto_tiny,
    network_config,
)
from custom.networks.tokenizer import VectorQuantizer, VQTokenizer, load_taming_checkpoint, perplexity

__all__ = [
    "EfficientViTBlock",
    "HoloHistoNet",
    "LiteMLA",
    "SwinUNETRBaseline",
    "UNetBaseline",
    "VQTokenizer",
    "VectorQuantizer",
    "build_network",
    "holohisto_full",
    "holohisto_tiny",
    "load_taming_checkpoint",
    "network_config",
    "perplexity",
    "relu_linear_attention",
    "softmax_attention",
]
