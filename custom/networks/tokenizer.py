"""The image tokenizer: a taming VQGAN encoder and vector quantizer applied window by window.

`VQTokenizer` applies the encoder (`encoder.py`) to non-overlapping windows of its training size (256 px
by default) laid over the input, a few windows at a time, and reassembles the token grid and the
encoder's higher-resolution features (the head's skips). The encoder's softmax attention therefore only
ever sees one window's tokens, and tokenizing costs time linear in pixels. It is keyed like a taming
VQModel (encoder.*, quant_conv.*, quantize.*), so `taming.load_taming_checkpoint` fills it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from einops import rearrange
from torch import nn

from custom.networks.checkpointing import maybe_checkpoint
from custom.networks.config import TokenizerConfig
from custom.networks.encoder import Encoder
from custom.networks.quantizer import VectorQuantizer


def _row_runs(positions: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """(image, row, column) window positions in raster order -> (image, row, first column, end column) runs."""
    runs: list[tuple[int, int, int, int]] = []
    for b, r, q in positions:
        if runs and runs[-1][:2] == (b, r) and runs[-1][3] == q:
            runs[-1] = (b, r, runs[-1][2], q + 1)
        else:
            runs.append((b, r, q, q + 1))
    return runs


class TokenizerOutput(NamedTuple):
    tokens: torch.Tensor  # B x code_dim x H/f x W/f quantized vectors (straight-through)
    indices: torch.Tensor  # B x H/f x W/f code indices
    loss: torch.Tensor  # the quantizer's codebook + commitment loss
    skips: list[torch.Tensor]  # encoder features at the requested strides, finest first


class VQTokenizer(nn.Module):
    """Windowed VQGAN tokenizer: encoder + quant_conv + quantize, built from a `TokenizerConfig`.

    `set_grad_checkpointing()` bounds training memory the way `window_batch` bounds inference memory:
    each window batch's encoder activations are recomputed in backward instead of kept (one more
    encoder forward per step), so a trainable tokenizer holds only its outputs for the whole patch.
    """

    def __init__(self, cfg: TokenizerConfig | None = None):
        super().__init__()
        self.cfg = cfg or TokenizerConfig()
        self.encoder = Encoder(self.cfg.vqgan)
        self.quant_conv = nn.Conv2d(self.cfg.vqgan.z_channels, self.cfg.code_dim, 1)
        self.quantize = VectorQuantizer(
            self.cfg.num_codes, self.cfg.code_dim, self.cfg.beta, self.cfg.kmeans_init, self.cfg.restart_every
        )
        self.window_px = self.cfg.vqgan.resolution
        self.window_batch = self.cfg.window_batch
        self.token_stride = self.cfg.vqgan.token_stride
        self.grad_checkpointing = False

    @property
    def config(self) -> dict[str, Any]:
        """The flat record of the config this tokenizer was built from (what tokenizer.pt stores)."""
        return self.cfg.to_dict()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def skip_channels(self, strides: Sequence[int]) -> list[int]:
        levels = self.encoder.level_strides
        missing = [s for s in strides if s not in levels]
        if missing:
            raise ValueError(f"no encoder level at strides {missing}; levels are at strides {levels}")
        return [self.encoder.level_channels[levels.index(s)] for s in strides]

    def _windowed(
        self, x: torch.Tensor, encode: Callable[[torch.Tensor], list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Run `encode` on window_batch windows at a time; place the maps it returns into whole-input maps.

        Windows are cut out of x one chunk at a time and each chunk's maps are written straight into
        their place, so besides the outputs only one chunk's worth of memory is live. A chunk is moved
        as runs of windows along a row, one copy per run rather than per window.
        """
        batch, rows, cols = x.shape[0], x.shape[-2] // self.window_px, x.shape[-1] // self.window_px
        positions = [(b, r, q) for b in range(batch) for r in range(rows) for q in range(cols)]
        outputs: list[torch.Tensor] = []
        for start in range(0, len(positions), self.window_batch):
            runs = _row_runs(positions[start : start + self.window_batch])
            row_runs = [x[b, :, self._span(r, 1), self._span(q0, q1 - q0)] for b, r, q0, q1 in runs]
            windows = torch.cat(
                [rearrange(run, "c h (q w) -> q c h w", w=self.window_px) for run in row_runs]
            )
            maps = encode(windows)
            if not outputs:
                outputs = [
                    m.new_empty((batch, m.shape[1], rows * m.shape[2], cols * m.shape[3])) for m in maps
                ]
            for out, chunk_maps in zip(outputs, maps, strict=True):
                size, first = chunk_maps.shape[-1], 0
                for b, r, q0, q1 in runs:
                    count = q1 - q0
                    target = out[b, :, r * size : (r + 1) * size, q0 * size : q1 * size].unflatten(
                        -1, (count, size)
                    )
                    target.copy_(rearrange(chunk_maps[first : first + count], "q c h w -> c h q w"))
                    first += count
        return outputs

    def _span(self, first: int, count: int) -> slice:
        return slice(first * self.window_px, (first + count) * self.window_px)

    def forward(self, x: torch.Tensor, skip_strides: Sequence[int] = ()) -> TokenizerOutput:
        """x: B x 3 x H x W in [-1, 1], H and W multiples of the window; returns tokens, codes, loss, skips."""
        losses: list[torch.Tensor] = []
        vectors = torch.empty(0)  # the last chunk's encoder outputs: the restart's source of new codes

        def encode(windows: torch.Tensor) -> list[torch.Tensor]:
            nonlocal vectors
            z, skips = self._encoder(windows, skip_strides)
            vectors = self.quant_conv(z)
            quantized = self.quantize(vectors)
            # Weighted by windows so the loss is the mean over all tokens, as one batch would give.
            losses.append(quantized.loss * windows.shape[0])
            return [quantized.quantized, quantized.indices[:, None], *skips]

        tokens, indices, *skips = self._windowed(x, encode)
        self.quantize.record_usage(indices[:, 0], vectors)
        windows_total = x.shape[0] * (x.shape[-2] // self.window_px) * (x.shape[-1] // self.window_px)
        return TokenizerOutput(tokens, indices[:, 0], torch.stack(losses).sum() / windows_total, skips)

    def _encoder(self, windows: torch.Tensor, skip_strides: Sequence[int]):
        # The quantizer stays outside the checkpoint: it updates state (k-means init, usage) that a
        # recomputation must not touch twice. The encoder (GroupNorm, no dropout) recomputes exactly.
        return maybe_checkpoint(
            self.grad_checkpointing and self.training, self.encoder, windows, tuple(skip_strides)
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantization vectors (quant_conv output) B x code_dim x H/f x W/f, window by window."""
        return self._windowed(x, lambda windows: [self.quant_conv(self.encoder(windows)[0])])[0]

    def encode_skips(self, x: torch.Tensor, skip_strides: Sequence[int]) -> list[torch.Tensor]:
        """Only the encoder features at `skip_strides` (the encoder stops after the coarsest one)."""
        checkpointed = self.grad_checkpointing and self.training
        strides = tuple(skip_strides)
        return self._windowed(
            x, lambda windows: maybe_checkpoint(checkpointed, self.encoder, windows, strides, False)[1]
        )

    def modules_unused_without_tokens(self, skip_strides: Sequence[int]) -> list[nn.Module]:
        """What `encode_skips(x, skip_strides)` never runs: frozen when a net uses no tokens."""
        return [*self.encoder.modules_after(max(skip_strides)), self.quant_conv, self.quantize]
