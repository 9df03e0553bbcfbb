"""Patch-level Dice: the mean Dice over a fixed grid of tissue patches (the paper's 4K patch-wise column).

The grid is anchored at the slide's level-0 top-left corner, made of square `patch_px` patches
(4096 by default; 1024 and 2048 on request), the last row and column clipped to the slide. A
patch is scored when it touches tissue. Both masks are streamed once, block by block, and every
patch keeps only its true-positive, false-positive and false-negative pixel counts. Counts add up,
so one pass gives every patch size (each a multiple of the smallest) and the whole-slide Dice too.

Empty patches: a patch where neither mask has foreground has no defined Dice (0 / 0). Scoring it
1.0 would let the glass-and-stroma patches that make up most of a slide swamp the mean, so it is
left out and counted as `empty`. A patch where only one mask has foreground scores 0.0, so missed
glomeruli and false positives on glomerulus-free tissue both count against the method. (KPIs
task 1 instead drops every patch with an empty ground truth, false positives included: that
protocol is `custom.metrics.kpis.kpis_task1`.)

Multi-class masks (labels 0..C-1): a patch's Dice is the mean over the labels present in either
mask in that patch; a patch with no label in either mask is empty as above.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from custom.metrics.dice import DiceCounts, MultiClassDice

DEFAULT_PATCH_PX = 4096  # the paper's 4K patch-wise evaluation
BLOCK_PX = 4096  # level-0 square read from both masks at a time: 16 MB each as uint8

BlockHook = Callable[[int, int, np.ndarray, np.ndarray], None]
"""on_block(y, x, pred_block, gt_block): sees every level-0 block as it streams past (y, x: top-left)."""


@dataclass
class GridCounts:
    """Dice pixel counts per cell of a level-0 grid of `cell_px` squares, per foreground label.

    `tp`, `fp` and `fn` have shape (rows, cols, labels); label k is mask value k + 1.
    """

    cell_px: int
    shape: tuple[int, int]  # level-0 (height, width) of the slide
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray

    @property
    def num_classes(self) -> int:
        return self.tp.shape[2] + 1

    def coarsen(self, patch_px: int) -> GridCounts:
        """The same counts on a grid of `patch_px` patches (a multiple of `cell_px`)."""
        if patch_px % self.cell_px:
            raise ValueError(f"patch size {patch_px} is not a multiple of the counted cell {self.cell_px}")
        k = patch_px // self.cell_px
        if k == 1:
            return self
        return GridCounts(patch_px, self.shape, *(_sum_groups(a, k) for a in (self.tp, self.fp, self.fn)))

    def total(self) -> MultiClassDice:
        """Whole-slide counts: every cell, tissue or not."""
        counts = MultiClassDice(self.num_classes)
        for k, label in enumerate(counts.counts):
            counts.counts[label] = DiceCounts(
                int(self.tp[..., k].sum()), int(self.fp[..., k].sum()), int(self.fn[..., k].sum())
            )
        return counts


@dataclass
class PatchDice:
    """Patch-level Dice of one slide at one patch size."""

    patch_px: int
    mean: float  # NaN when no patch could be scored (no foreground anywhere on tissue)
    scored: int  # patches in the mean
    empty: int  # tissue patches with no foreground in either mask: left out
    tissue: int  # patches of the grid that were eligible (touch tissue)
    scores: np.ndarray  # (rows, cols) Dice per patch, NaN where not scored


def count_grid(
    pred,
    gt,
    cell_px: int = DEFAULT_PATCH_PX,
    num_classes: int = 2,
    block_px: int = BLOCK_PX,
    on_block: BlockHook | None = None,
) -> GridCounts:
    """Stream two level-0 masks (arrays, or mask slides from `open_mask`) into per-cell Dice counts.

    Two classes: anything > 0 is foreground in either mask (0/1 and 0/255 masks agree). More
    classes: label c counts where the mask equals c. `on_block` gets every block's raw pixels, so
    other per-slide measurements can share the one pass over level 0.
    """
    shape = _shape(pred)
    if _shape(gt) != shape:
        raise ValueError(f"prediction {shape} and ground truth {_shape(gt)} differ in shape (height, width)")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    block_px = math.ceil(block_px / cell_px) * cell_px  # blocks hold whole cells
    rows, cols = math.ceil(shape[0] / cell_px), math.ceil(shape[1] / cell_px)
    tp, fp, fn = (np.zeros((rows, cols, num_classes - 1), np.int64) for _ in range(3))
    for y in range(0, shape[0], block_px):
        for x in range(0, shape[1], block_px):
            size = (min(block_px, shape[0] - y), min(block_px, shape[1] - x))
            p, g = _read(pred, (y, x), size), _read(gt, (y, x), size)
            if on_block is not None:
                on_block(y, x, p, g)
            if not (p.any() or g.any()):
                continue  # glass and unlabelled tissue: all counts stay 0
            r0, c0 = y // cell_px, x // cell_px
            for k in range(num_classes - 1):
                pm, gm = (p > 0, g > 0) if num_classes == 2 else (p == k + 1, g == k + 1)
                both = pm & gm
                for i, cy in enumerate(range(0, size[0], cell_px)):
                    for j, cx in enumerate(range(0, size[1], cell_px)):
                        cell = np.s_[cy : cy + cell_px, cx : cx + cell_px]
                        t = np.count_nonzero(both[cell])
                        tp[r0 + i, c0 + j, k] = t
                        fp[r0 + i, c0 + j, k] = np.count_nonzero(pm[cell]) - t
                        fn[r0 + i, c0 + j, k] = np.count_nonzero(gm[cell]) - t
    return GridCounts(cell_px, shape, tp, fp, fn)


def tissue_patches(tissue, shape: Sequence[int], patch_px: int) -> np.ndarray:
    """(rows, cols) bool: which patches of the grid touch tissue (`custom.data.tissue.TissueMask`)."""
    rows, cols = math.ceil(shape[0] / patch_px), math.ceil(shape[1] / patch_px)
    keep = np.zeros((rows, cols), bool)
    for i in range(rows):
        for j in range(cols):
            keep[i, j] = tissue.touches((i * patch_px, j * patch_px), (patch_px, patch_px))
    return keep


def patch_dice(counts: GridCounts, eligible: np.ndarray | None = None) -> PatchDice:
    """Mean Dice over the patches of `counts` that are `eligible` (default: all) and not empty."""
    denom = 2 * counts.tp + counts.fp + counts.fn
    present = denom > 0
    per_label = np.divide(2 * counts.tp, denom, out=np.full(denom.shape, np.nan), where=present)
    empty = ~present.any(axis=2)
    labels_present = present.sum(axis=2)
    # mean over the labels present in the patch; empty patches stay NaN
    scores = np.divide(
        np.nansum(per_label, axis=2), labels_present, out=np.full(empty.shape, np.nan), where=~empty
    )
    if eligible is None:
        eligible = np.ones(empty.shape, bool)
    if eligible.shape != empty.shape:
        raise ValueError(f"eligible patches {eligible.shape} do not match the grid {empty.shape}")
    scored = eligible & ~empty
    scores = np.where(scored, scores, np.nan)
    mean = float(scores[scored].mean()) if scored.any() else float("nan")
    return PatchDice(
        patch_px=counts.cell_px,
        mean=mean,
        scored=int(scored.sum()),
        empty=int((eligible & empty).sum()),
        tissue=int(eligible.sum()),
        scores=scores,
    )


def _sum_groups(a: np.ndarray, k: int) -> np.ndarray:
    """Sum k x k groups of cells; the grid is padded with zero counts to a multiple of k."""
    rows, cols = math.ceil(a.shape[0] / k), math.ceil(a.shape[1] / k)
    padded = np.zeros((rows * k, cols * k, *a.shape[2:]), a.dtype)
    padded[: a.shape[0], : a.shape[1]] = a
    return padded.reshape(rows, k, cols, k, *a.shape[2:]).sum(axis=(1, 3))


def _shape(source) -> tuple[int, int]:
    if isinstance(source, np.ndarray):
        return tuple(source.shape[:2])
    return tuple(source.level_shapes[0])


def _read(source, location: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source[location[0] : location[0] + size[0], location[1] : location[1] + size[1]]
    return source.read_region(location, size, level=0)
