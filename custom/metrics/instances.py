"""Object-level scores for glomeruli: detection precision, recall, F1 at an IoU threshold, count error."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

# 8-connectivity: diagonal touches join one glomerulus, as in the KPIs protocol's OpenCV labelling.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Instance metrics run on both masks sampled every `factor` level-0 pixels: the coarsest power of
# two that keeps pixels at most 2 um wide, so a 60-um mouse glomerulus still spans 30 pixels ...
INSTANCE_UM_PER_PX = 2.0
# ... unless the sampled masks would exceed this many pixels (128 Mpx: ~1.3 GB with both label
# images), in which case the factor doubles until they fit, whatever the slide size.
MAX_INSTANCE_PX = 2**27


@dataclass
class InstanceScores:
    n_pred: int
    n_gt: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    count_error: int  # n_pred - n_gt: positive means over-counting

    def as_dict(self) -> dict:
        return asdict(self)


def instance_scores(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> InstanceScores:
    """Match connected components of two binary masks one to one at IoU >= `iou_threshold`.

    With a threshold of at least 0.5 a component can overlap at most one partner that much, so a
    greedy pass over the IoU table is the optimal matching. Empty vs empty scores 1.0 everywhere.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    pred_labels, n_pred = ndi.label(pred > 0, structure=EIGHT_CONNECTED)
    gt_labels, n_gt = ndi.label(gt > 0, structure=EIGHT_CONNECTED)
    tp = _count_matches(pred_labels, n_pred, gt_labels, n_gt, iou_threshold)
    fp, fn = n_pred - tp, n_gt - tp
    precision = tp / n_pred if n_pred else (1.0 if n_gt == 0 else 0.0)
    recall = tp / n_gt if n_gt else (1.0 if n_pred == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return InstanceScores(n_pred, n_gt, tp, fp, fn, precision, recall, f1, n_pred - n_gt)


def _count_matches(pred_labels, n_pred, gt_labels, n_gt, iou_threshold) -> int:
    if n_pred == 0 or n_gt == 0:
        return 0
    both = (pred_labels > 0) & (gt_labels > 0)
    # Intersections of every (pred, gt) pair that touches, from one pass over the overlapping pixels.
    pair_ids = pred_labels[both].astype(np.int64) * (n_gt + 1) + gt_labels[both]
    pairs, inter = np.unique(pair_ids, return_counts=True)
    p_idx, g_idx = np.divmod(pairs, n_gt + 1)
    pred_area = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    gt_area = np.bincount(gt_labels.ravel(), minlength=n_gt + 1)
    iou = inter / (pred_area[p_idx] + gt_area[g_idx] - inter)
    used_pred: set[int] = set()
    used_gt: set[int] = set()
    for k in np.argsort(-iou, kind="stable"):
        if iou[k] < iou_threshold:
            break
        p, g = int(p_idx[k]), int(g_idx[k])
        if p not in used_pred and g not in used_gt:
            used_pred.add(p)
            used_gt.add(g)
    return len(used_pred)


class MaskSampler:
    """Both masks sampled every `factor` level-0 pixels, collected from the blocks of one pass.

    Each sample is the level-0 pixel at the centre of its `factor` x `factor` cell, the same rule
    for prediction and truth, whatever their pyramid levels were built with (our predictions'
    levels are max-pooled, which would swell objects and merge neighbours).
    """

    def __init__(self, shape: tuple[int, int], factor: int):
        self.factor = int(factor)
        self.offset = self.factor // 2
        rows = len(range(self.offset, shape[0], self.factor))
        cols = len(range(self.offset, shape[1], self.factor))
        self.pred = np.zeros((rows, cols), bool)
        self.gt = np.zeros((rows, cols), bool)

    def __call__(self, y: int, x: int, pred_block: np.ndarray, gt_block: np.ndarray) -> None:
        f, o = self.factor, self.offset
        if y % f or x % f:
            raise ValueError(f"block origin ({y}, {x}) is not on the {f}-px sampling grid")
        for target, block in ((self.pred, pred_block), (self.gt, gt_block)):
            sample = block[o::f, o::f] > 0  # binary: detection counts glomeruli of any label
            target[y // f : y // f + sample.shape[0], x // f : x // f + sample.shape[1]] = sample


def instance_factor(
    shape: tuple[int, int],
    mpp: float,
    target_um_per_px: float = INSTANCE_UM_PER_PX,
    max_px: int = MAX_INSTANCE_PX,
) -> int:
    """The level-0 sampling step for instance metrics: the largest power of two whose pixels stay
    at most `target_um_per_px` wide, doubled while the sampled mask would exceed `max_px` pixels."""
    factor = 1
    while mpp * factor * 2 <= target_um_per_px * (1 + 1e-6):
        factor *= 2
    while math.ceil(shape[0] / factor) * math.ceil(shape[1] / factor) > max_px:
        factor *= 2
    return factor
