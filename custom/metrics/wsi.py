"""Dice over a whole slide at full resolution, tile by tile: neither mask is ever loaded whole."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from custom.errors import ConfigError
from custom.metrics.dice import MultiClassDice
from custom.wsi.reader import open_mask

BLOCK_PX = 4096  # level-0 block read from both masks at a time (16 MB each as uint8)


def wsi_dice_counts(pred, gt, num_classes: int = 2, binarize_gt: bool = True, block_px: int = BLOCK_PX):
    """Per-class Dice counts of two level-0 masks (paths or opened mask slides).

    With `binarize_gt` (two classes) any ground-truth value > 0 is foreground, so 0/1 and 0/255
    masks score the same.
    """
    pred_mask = open_mask(pred) if isinstance(pred, (str, Path)) else pred
    gt_mask = open_mask(gt) if isinstance(gt, (str, Path)) else gt
    shape = tuple(gt_mask.level_shapes[0])
    if tuple(pred_mask.level_shapes[0]) != shape:
        raise ConfigError(
            f"{pred_mask.path}: prediction is {pred_mask.level_shapes[0]} but its ground truth "
            f"{gt_mask.path} is {shape} (height, width) at level 0"
        )
    counts = MultiClassDice(num_classes)
    for y in range(0, shape[0], block_px):
        for x in range(0, shape[1], block_px):
            size = (min(block_px, shape[0] - y), min(block_px, shape[1] - x))
            p = pred_mask.read_region((y, x), size, level=0)
            g = gt_mask.read_region((y, x), size, level=0)
            if binarize_gt and num_classes == 2:
                g = (g > 0).astype(np.uint8)
                p = (p > 0).astype(np.uint8)
            if p.any() or g.any():
                counts.add(p, g)
    return counts


def wsi_dice(pred, gt, num_classes: int = 2, **kwargs) -> float:
    """Mean foreground-class Dice over the whole slide (1.0 when both masks are empty)."""
    return wsi_dice_counts(pred, gt, num_classes, **kwargs).mean()
