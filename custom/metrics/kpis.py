"""The KPIs 2024 challenge's own evaluation, step for step.

Task 2 (whole slide), as the organisers' `unet_validation_slide.py` scores a slide:

1. resample the slide by 1/2 with an order-1 zoom (`scipy.ndimage.zoom`), except class NEP25 (1/1);
2. cut the resampled slide into 2048-px tiles with a 1024-px stride, the last tile on each axis
   flush with the far edge;
3. add up the binary tile predictions and keep the pixels with more than one vote;
4. remove 8-connected components under 20,000 pixels;
5. Dice against the resampled ground truth, 1.0 when both are empty;
6. detection precision / recall / F1: OpenCV contours of both masks, a prediction is a true
   positive when its filled contour has IoU >= 0.5 with some ground-truth contour.

Where the organisers' script does something surprising we keep it, because leaderboard numbers
depend on it, and say so: ground-truth pixels count for Dice only where the zoomed mask is still
fully foreground (they read it back as float and cast to int8), but count for contours where it
is above 0; the first contour (the frame of the inverted image) is dropped; precision and recall
share the prediction-side true-positive count; F1 is 0 when both masks are empty.
One deliberate deviation: their contour IoU shifts contour arrays in place, so later comparisons
see moved contours; we compute the IoU that code intends, on unmodified contours.

Our masks are stitched whole-slide predictions, so every tile "prediction" in step 3 is a crop of
one binary map, and a pixel's votes are its tile coverage times its value: we count coverage per
axis instead of materialising a vote image (identical result, a fraction of the memory).

Task 1 (patches): the mean over patches of MONAI's Dice of a 0.5-thresholded prediction against
the min-max scaled mask; patches with an empty mask are left out (MONAI's `ignore_empty`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from custom.metrics.dice import dice_score

TILE_PX = 2048
STRIDE_PX = 1024
MIN_OBJECT_PX = 20_000
IOU_THRESHOLD = 0.5
CROP_MARGIN_PX = 10  # the organisers' margin around the two contours' joint bounding box
FULL_RESOLUTION_CLASSES = ("NEP25",)  # scored without the 1/2 resampling
FOREGROUND = 255


def downsample_factor(class_name: str | None) -> int:
    return 1 if class_name in FULL_RESOLUTION_CLASSES else 2


@dataclass
class KPIsResult:
    dice: float
    precision: float
    recall: float
    f1: float
    n_pred: int
    n_gt: int

    def as_dict(self) -> dict:
        return asdict(self)


def zoom_order1(source, factor: int, band_rows: int = 4096) -> np.ndarray:
    """`scipy.ndimage.zoom(mask * 255, 1 / factor, order=1)` of a binary mask, read band by band.

    `source` is a 2-D array or a mask slide (`.level_shapes`, `.read_region`). Rows are computed
    with the same coordinate map as scipy (grid_mode=False), so the result equals the whole-array
    zoom exactly while only `band_rows` input rows are in memory at a time.
    """
    height, width = _shape(source)
    if factor == 1:
        return _read_rows(source, 0, height, width)
    out_h, out_w = round(height / factor), round(width / factor)
    r0, r1, fr = _linear_weights(height, out_h)
    c0, c1, fc = _linear_weights(width, out_w)
    out = np.empty((out_h, out_w), dtype=np.uint8)
    rows_per_band = max(1, band_rows // factor)
    for start in range(0, out_h, rows_per_band):
        stop = min(out_h, start + rows_per_band)
        lo, hi = int(r0[start]), int(r1[stop - 1]) + 1
        band = _read_rows(source, lo, hi - lo, width).astype(np.float64)
        rows = (
            band[r0[start:stop] - lo] * (1 - fr[start:stop, None])
            + band[r1[start:stop] - lo] * fr[start:stop, None]
        )
        cols = rows[:, c0] * (1 - fc) + rows[:, c1] * fc
        out[start:stop] = np.floor(cols + 0.5)
    return out


def tile_origins(length: int, tile_px: int = TILE_PX, stride_px: int = STRIDE_PX) -> list[int]:
    """The organisers' tile starts on one axis: every stride, the last one flush with the edge.

    A slide shorter than one tile gets a single tile clipped to the slide (their script fails there).
    """
    if length <= tile_px:
        return [0]
    n = (length - tile_px) // stride_px + 1
    return [i * stride_px for i in range(n - 1)] + [length - tile_px]


def axis_coverage(length: int, tile_px: int = TILE_PX, stride_px: int = STRIDE_PX) -> np.ndarray:
    """How many tiles cover each position along one axis."""
    cover = np.zeros(length + 1, dtype=np.int32)
    for start in tile_origins(length, tile_px, stride_px):
        cover[start] += 1
        cover[min(length, start + tile_px)] -= 1
    return np.cumsum(cover)[:length]


def vote_filter(pred: np.ndarray, tile_px: int = TILE_PX, stride_px: int = STRIDE_PX) -> np.ndarray:
    """Pixels of a binary map that collect more than one vote from the overlapping tiles."""
    rows = axis_coverage(pred.shape[0], tile_px, stride_px)
    cols = axis_coverage(pred.shape[1], tile_px, stride_px)
    votes = rows[:, None] * cols[None, :]
    return (pred > 0) & (votes > 1)


def remove_small_components(mask: np.ndarray, min_px: int = MIN_OBJECT_PX) -> np.ndarray:
    """Keep 8-connected components of at least `min_px` pixels (OpenCV, as the organisers)."""
    binary = (mask > 0).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_px
    return keep[labels]


def object_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Contours as the organisers take them: of the inverted mask, all levels, the first one dropped."""
    inverted = np.where(mask > 0, 0, FOREGROUND).astype(np.uint8)
    contours, _ = cv2.findContours(inverted, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    return list(contours[1:])


def contour_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two filled contours, drawn on a canvas around both (no in-place shifting)."""
    ax, ay = a[:, 0, 0], a[:, 0, 1]
    bx, by = b[:, 0, 0], b[:, 0, 1]
    if ax.max() < bx.min() or bx.max() < ax.min() or ay.max() < by.min() or by.max() < ay.min():
        return 0.0
    x0 = min(ax.min(), bx.min()) - CROP_MARGIN_PX
    y0 = min(ay.min(), by.min()) - CROP_MARGIN_PX
    x1 = max(ax.max(), bx.max()) + CROP_MARGIN_PX
    y1 = max(ay.max(), by.max()) + CROP_MARGIN_PX
    shape = (int(y1 - y0), int(x1 - x0))
    offset = np.array([x0, y0], dtype=a.dtype)
    fill_a = np.zeros(shape, np.uint8)
    fill_b = np.zeros(shape, np.uint8)
    cv2.drawContours(fill_a, [a - offset], -1, 1, -1)
    cv2.drawContours(fill_b, [b - offset], -1, 1, -1)
    union = np.count_nonzero(fill_a | fill_b)
    return np.count_nonzero(fill_a & fill_b) / union if union else 0.0


def detection_scores(
    pred_contours: list[np.ndarray], gt_contours: list[np.ndarray], iou_threshold: float = IOU_THRESHOLD
) -> tuple[float, float, float]:
    """(precision, recall, F1) counted as the organisers count them."""
    ious = np.array([[contour_iou(p, g) for g in gt_contours] for p in pred_contours]).reshape(
        len(pred_contours), len(gt_contours)
    )
    hit = ious >= iou_threshold
    tp = int(hit.any(axis=1).sum())
    fp = len(pred_contours) - tp
    fn = int((~hit.any(axis=0)).sum())
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def kpis_task2(
    pred,
    gt,
    class_name: str | None = None,
    tile_px: int = TILE_PX,
    stride_px: int = STRIDE_PX,
    min_object_px: int = MIN_OBJECT_PX,
    iou_threshold: float = IOU_THRESHOLD,
) -> KPIsResult:
    """Score one slide by the official task-2 protocol.

    `pred` and `gt` are full-resolution binary masks (anything > 0 is glomerulus), as 2-D arrays or
    mask slides from `custom.wsi.reader.open_mask`. The resampled masks are held in memory (one
    byte per pixel at half resolution), as in the organisers' script.
    """
    if _shape(pred) != _shape(gt):
        raise ValueError(f"prediction {_shape(pred)} and ground truth {_shape(gt)} differ in shape")
    factor = downsample_factor(class_name)
    pred_small = zoom_order1(pred, factor) >= (FOREGROUND + 1) // 2
    gt_small = zoom_order1(gt, factor)
    final = remove_small_components(vote_filter(pred_small, tile_px, stride_px), min_object_px)
    dice = dice_score(final, gt_small == FOREGROUND)
    pred_contours = object_contours(final)
    gt_contours = object_contours(gt_small > 0)
    precision, recall, f1 = detection_scores(pred_contours, gt_contours, iou_threshold)
    return KPIsResult(dice, precision, recall, f1, len(pred_contours), len(gt_contours))


def kpis_patch_dice(pred: np.ndarray, mask: np.ndarray) -> float:
    """Task-1 Dice of one patch: binary prediction against the min-max scaled mask; NaN if the mask is empty."""
    y = mask.astype(np.float64)
    lo, hi = y.min(), y.max()
    y = (y - lo) / (hi - lo) if hi > lo else np.zeros_like(y)
    p = (pred >= 0.5).astype(np.float64)  # binary masks (0/1, 0/255, bool) and probabilities alike
    y_sum = y.sum()
    if y_sum == 0:
        return float("nan")
    return float(2 * (p * y).sum() / (y_sum + p.sum()))


def kpis_task1(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean task-1 Dice over (prediction, mask) patches, leaving out patches with an empty mask."""
    scores = [kpis_patch_dice(p, m) for p, m in pairs]
    valid = [s for s in scores if not np.isnan(s)]
    return float(np.mean(valid)) if valid else float("nan")


def _linear_weights(n_in: int, n_out: int):
    """Source rows and weights of scipy's order-1 zoom along one axis (grid_mode=False)."""
    coords = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    i0 = np.floor(coords).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, coords - i0


def _shape(source) -> tuple[int, int]:
    if isinstance(source, np.ndarray):
        return source.shape[:2]
    return tuple(source.level_shapes[0])


def _read_rows(source, top: int, count: int, width: int) -> np.ndarray:
    """Rows [top, top + count) as a 0/255 uint8 binary mask."""
    if isinstance(source, np.ndarray):
        rows = source[top : top + count]
    else:
        rows = source.read_region((top, 0), (count, width), level=0)
    return np.where(rows > 0, FOREGROUND, 0).astype(np.uint8)
