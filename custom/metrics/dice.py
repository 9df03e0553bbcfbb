"""Dice from confusion counts, so a whole slide can be scored one tile at a time.

Not MONAI's `compute_dice`: it needs both masks whole in memory, and a slide's mask is never whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def dice_score(pred: np.ndarray, gt: np.ndarray, empty: float = 1.0) -> float:
    """Binary Dice of two masks (anything > 0 is foreground); `empty` when both are empty."""
    counts = DiceCounts()
    counts.add(pred, gt)
    return counts.dice(empty)


@dataclass
class DiceCounts:
    """Running true-positive / false-positive / false-negative pixel counts for one class."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
        p = pred > 0
        g = gt > 0
        tp = int(np.count_nonzero(p & g))
        self.tp += tp
        self.fp += int(np.count_nonzero(p)) - tp
        self.fn += int(np.count_nonzero(g)) - tp

    def merge(self, other: DiceCounts) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn

    def dice(self, empty: float = 1.0) -> float:
        denom = 2 * self.tp + self.fp + self.fn
        return empty if denom == 0 else 2 * self.tp / denom

    @property
    def has_foreground(self) -> bool:
        return self.tp + self.fp + self.fn > 0


class MultiClassDice:
    """Per-class Dice counts for label maps with values 0..num_classes-1 (0 is background)."""

    def __init__(self, num_classes: int = 2):
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
        self.num_classes = num_classes
        self.counts = {c: DiceCounts() for c in range(1, num_classes)}

    def add(self, pred: np.ndarray, gt: np.ndarray) -> None:
        for c, counts in self.counts.items():
            counts.add(pred == c, gt == c)

    def merge(self, other: MultiClassDice) -> None:
        for c, counts in self.counts.items():
            counts.merge(other.counts[c])

    def per_class(self, empty: float = 1.0) -> dict[int, float]:
        return {c: counts.dice(empty) for c, counts in self.counts.items()}

    def mean(self, empty: float = 1.0) -> float:
        """Average over the foreground classes."""
        scores = self.per_class(empty)
        return float(np.mean(list(scores.values())))
