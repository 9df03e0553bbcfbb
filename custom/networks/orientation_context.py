"""A fixed, parameter-free context branch: how uniform the tissue's texture orientation is around each
token, over fields of a quarter to two millimetres.

Why fixed: benchmarks/context_probe.py found that the tell of the context decoys (medulla tubules keep
one orientation over millimetres, cortex tubules turn) reaches the encoder's first layers with random
weights, and that segmentation training retunes those filters away from orientation, so no later
stage builds the field-wide statistic. This branch cannot be retuned: it has no weights. The head
learns only how to use its maps (`SegmentationHead`'s `context_proj`).

For B x 3 x H x W pixels on the net's [-1, 1] scale (H, W multiples of `cell_px`):
    grey, 2 x 2-averaged -> Gaussian-derivative gradients (sigma `gradient_sigma_px`) -> structure
    tensor summed per cell (`cell_px`, the token stride) -> summed again over `vector_cells` x `vector_cells` cells (one
    orientation per ~tubule) -> doubled-angle vector times coherence, per cell
    -> for each field of F x F cells: R_F = |mean vector| / mean coherence (1: one orientation over
       the whole field; lower where it turns), over tissue only, clipped to the patch
    -> maps [log(1 + TURNING_FLOOR - R_F) for each field ..., tissue fraction of the largest field],
       B x K x H/cell x W/cell: the turning, on a log scale.
Glass (grey above GLASS_GREY) and the net's white padding weigh nothing, so a field near a tile or
tissue edge is read from the tissue it has.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Mean RGB above 225 of 255 is glass (benchmarks/context_signal.py's threshold), on the [-1, 1] scale.
GLASS_GREY = 225 / 255 * 2 - 1
GREY_POOL = 2
TURNING_FLOOR = 0.01  # log(1 + floor - R): R = 1 (one orientation) maps to log(0.01), R = 0 to ~0


def box_sum(x: torch.Tensor, side: int) -> torch.Tensor:
    """Sum over a side x side box at every position of B x C x H x W, clipped at the border (no padding
    counted): summed-area differences, so a 2-mm field costs what a 64-um one does."""
    before, after = side // 2, side - side // 2
    height, width = x.shape[-2:]
    table = F.pad(x.cumsum(-2).cumsum(-1), (1, 0, 1, 0))
    ys = torch.arange(height, device=x.device)
    xs = torch.arange(width, device=x.device)
    y0, y1 = (ys - before).clamp(0, height), (ys + after).clamp(0, height)
    x0, x1 = (xs - before).clamp(0, width), (xs + after).clamp(0, width)
    rows_hi, rows_lo = table[..., y1, :], table[..., y0, :]
    return rows_hi[..., x1] - rows_hi[..., x0] - rows_lo[..., x1] + rows_lo[..., x0]


def gaussian_derivative_kernels(sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D Gaussian and its derivative (d/dt), sampled out to 3 sigma."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    return g, -t / sigma**2 * g


class OrientationContext(nn.Module):
    """Texture-orientation uniformity maps at the token stride; see the module docstring."""

    def __init__(
        self,
        cell_px: int = 16,
        gradient_sigma_px: float = 3.0,
        vector_cells: int = 8,
        field_cells: Sequence[int] = (16, 32, 64, 128),
    ):
        super().__init__()
        self.cell_px = cell_px
        self.vector_cells = vector_cells
        self.field_cells = tuple(field_cells)
        # Gradients at sigma 3 px need no full-resolution pixels: the grey image is 2x2-averaged first,
        # which costs the branch a quarter of the filtering.
        smooth, derivative = gaussian_derivative_kernels(gradient_sigma_px / GREY_POOL)
        self.register_buffer("smooth", smooth, persistent=False)
        self.register_buffer("derivative", derivative, persistent=False)

    @property
    def out_channels(self) -> int:
        return len(self.field_cells) + 1

    def _filter(self, grey: torch.Tensor, along_y: torch.Tensor, along_x: torch.Tensor) -> torch.Tensor:
        pad = along_y.numel() // 2
        out = F.conv2d(F.pad(grey, (0, 0, pad, pad), mode="replicate"), along_y.view(1, 1, -1, 1))
        return F.conv2d(F.pad(out, (pad, pad, 0, 0), mode="replicate"), along_x.view(1, 1, 1, -1))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = F.avg_pool2d(x.float().mean(1, keepdim=True), GREY_POOL)
        gy = self._filter(grey, self.derivative, self.smooth)
        gx = self._filter(grey, self.smooth, self.derivative)
        tissue = (grey < GLASS_GREY).float()
        tensor = torch.cat([gx * gx, gy * gy, gx * gy], 1) * tissue
        cells = F.avg_pool2d(torch.cat([tensor, tissue], 1), self.cell_px // GREY_POOL)
        pooled = box_sum(cells, self.vector_cells)
        jxx, jyy, jxy, weight = pooled.unbind(1)
        trace = jxx + jyy
        scale = trace.flatten(1).amax(1).view(-1, 1, 1) * 1e-6 + 1e-12  # no 0/0 on blank cells
        c, s = (jxx - jyy) / (trace + scale), 2 * jxy / (trace + scale)
        # Tissue fraction around each cell, of the cells inside the patch (a border cell is not glass).
        weight = weight / box_sum(torch.ones_like(cells[:, :1]), self.vector_cells)[:, 0]
        maps = torch.stack([weight * c, weight * s, weight * torch.hypot(c, s), weight], 1)
        out = []
        for side in self.field_cells:
            sc, ss, coherence, w = box_sum(maps, side).unbind(1)
            # |sum of vectors| <= sum of their lengths, so R is in [0, 1]; a field without tissue gives 0.
            uniformity = torch.hypot(sc, ss) / coherence.clamp_min(1e-6)
            # On a log scale of the turning left (1 - R), medulla (R ~0.93) and cortex (R ~0.75) sit
            # ~1.2 apart, a step the head's unnormalised projection can weigh at its initial scale.
            out.append(torch.log(1 + TURNING_FLOOR - uniformity.clamp(0, 1)))
        largest = self.field_cells[-1]  # the loop's last field: its tissue share tells how much context
        out.append(w / largest**2)
        return torch.stack(out, 1).to(x.dtype)
