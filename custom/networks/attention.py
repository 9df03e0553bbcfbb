"""Attention over a 2D token grid: EfficientViT's multi-scale ReLU linear attention and a softmax twin.

`LiteMLA` builds q, k, v with a 1x1 conv, adds multi-scale copies of them (depthwise 5x5 conv then a
grouped 1x1 conv, so each new head sees a 5x5 neighbourhood of tokens), and attends within every head.
The two kernels share those layers and the output projection, so the paper's ablation (ReLU linear vs
softmax MHSA) changes nothing but the attention itself:

- "linear": q, k -> ReLU; out_i = sum_j (k_j . q_i) v_j / (sum_j k_j . q_i + eps), evaluated as
  (V K^T) Q / ((sum_j K_j)^T Q + eps). That is O(N d^2) in N tokens instead of O(N^2 d).
- "softmax": `scaled_dot_product_attention`, O(N^2) time.

Channel layout of the qkv tensor (as in EfficientViT): heads are consecutive blocks of 3 * head_dim
channels, each [q | k | v].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from custom.networks.blocks import ConvLayer, MBConv, ResidualBlock

ATTENTION_KERNELS = ("linear", "softmax")
# Keeps the normaliser away from 0 when every ReLU(k) . ReLU(q) is 0; float32 represents it.
LINEAR_ATTENTION_EPS = 1e-15


def relu_linear_attention(
    qkv: torch.Tensor, head_dim: int, eps: float = LINEAR_ATTENTION_EPS
) -> torch.Tensor:
    """The attention core: B x (heads*3*head_dim) x H x W -> B x (heads*head_dim) x H x W, float32.

    It runs in float32 with autocast off: the numerator and the normaliser are sums over every token
    of the 4K grid (65k tokens at f=16), which bf16's 8-bit mantissa cannot hold.
    """
    batch, _, height, width = qkv.shape
    with torch.autocast(device_type="cuda" if qkv.is_cuda else "cpu", enabled=False):
        qkv = qkv.float().reshape(batch, -1, 3 * head_dim, height * width)
        q, k, v = qkv.split(head_dim, dim=2)  # each B x heads x head_dim x N
        q = F.relu(q)
        k = F.relu(k)
        kv = torch.matmul(v, k.transpose(-1, -2))  # B x heads x d_v x d_k: the O(N d^2) step
        numerator = torch.matmul(kv, q)
        normaliser = torch.matmul(k.sum(dim=-1, keepdim=True).transpose(-1, -2), q)  # B x heads x 1 x N
        out = numerator / (normaliser + eps)
    return out.reshape(batch, -1, height, width)


def softmax_attention(qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Softmax MHSA over all tokens with the same qkv layout as `relu_linear_attention`."""
    batch, _, height, width = qkv.shape
    qkv = qkv.reshape(batch, -1, 3 * head_dim, height * width).transpose(-1, -2)  # B x heads x N x 3d
    # Contiguous q, k, v let SDPA pick its flash kernel on CPU too (O(N) memory); on these strided
    # views it falls back to the math kernel, which materialises the N x N matrix: 14 GB at 2K input.
    q, k, v = (t.contiguous() for t in qkv.split(head_dim, dim=-1))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(-1, -2).reshape(batch, -1, height, width)


class LiteMLA(nn.Module):
    """Multi-scale attention (EfficientViT's LiteMLA) with a choice of kernel, see the module docstring."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        head_dim: int = 16,
        scales: Sequence[int] = (5,),
        kernel: str = "linear",
    ):
        super().__init__()
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
        if in_channels % head_dim:
            raise ValueError(f"width {in_channels} is not a multiple of head_dim {head_dim}")
        self.kernel = kernel
        self.head_dim = head_dim
        heads = in_channels // head_dim
        qkv_channels = 3 * heads * head_dim
        self.qkv = ConvLayer(in_channels, qkv_channels, 1, norm=None, act=None, bias=False)
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(
                    qkv_channels, qkv_channels, scale, padding=scale // 2, groups=qkv_channels, bias=False
                ),
                nn.Conv2d(qkv_channels, qkv_channels, 1, groups=3 * heads, bias=False),
            )
            for scale in scales
        )
        self.proj = ConvLayer(heads * head_dim * (1 + len(scales)), out_channels, 1, norm="bn", act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        qkv = torch.cat([qkv, *(op(qkv) for op in self.aggreg)], dim=1)
        if self.kernel == "linear":
            out = relu_linear_attention(qkv, self.head_dim)
        else:
            out = softmax_attention(qkv, self.head_dim)
        # Back to the block's dtype: under autocast that is float32 anyway; in a bf16 model the
        # projection's weights need bf16.
        return self.proj(out.to(x.dtype))


class EfficientViTBlock(nn.Module):
    """Global context then local mixing: x + LiteMLA(x), then x + MBConv(x)."""

    def __init__(
        self,
        channels: int,
        head_dim: int = 16,
        expand_ratio: float = 4,
        scales: Sequence[int] = (5,),
        kernel: str = "linear",
    ):
        super().__init__()
        self.context_module = ResidualBlock(LiteMLA(channels, channels, head_dim, scales, kernel))
        self.local_module = ResidualBlock(MBConv(channels, channels, expand_ratio=expand_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))
