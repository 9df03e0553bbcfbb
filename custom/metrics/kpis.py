"""The KPIs 2024 challenge's scoring, read from the organisers' task-2 example and task-1 validator.

Task 2 (whole slide). The organisers' `unet_validation_slide.py` (hrlblab/KPIs2024), which their
README calls "your inference code", does two things: it *predicts* (zoom the slide to 20X, run
2048-px tiles at a 1024-px stride, keep pixels more than one tile voted for, drop objects under
20,000 px) and then it *scores* that 20X mask. A mask we submit has been predicted already, so the
default figures (`dice`, `precision`, `recall`, `f1`) score a stitched mask as submitted:

1. resample to 20X as the script resamples: `scipy.ndimage.zoom(order=1)` by 1/2, except when
   "NEP25" appears anywhere in the path (those slides are native 20X: 1/1); computed band by band
   with scipy's coordinate map, equal to the whole-array zoom;
2. threshold: the zoomed prediction is foreground at >= 128 of 255, the binarisation the script's
   `sodelete` applies (`cv2.threshold(x * 255, 127)`); the zoomed truth is read as the script
   reads it back from its PNG: foreground for Dice only where it is 255 (the script casts the 0..1
   floats to int8), foreground for contours where it is > 0;
3. Dice, 1.0 when both masks are empty;
4. detection: OpenCV contours (RETR_TREE, CHAIN_APPROX_SIMPLE) of the inverted masks, the first
   one (the frame) dropped; a predicted contour is a true positive when its filled area has
   IoU >= 0.5 with any true contour, a true contour is missed when no predicted one reaches 0.5 with
   it; precision, recall, F1 from those counts, F1 0 when both are 0 (both masks empty included).

Contour IoU: ours is the geometric IoU of the two filled contours. The script's IoU function
shifts both contour arrays in place, so every later comparison sees moved contours: unrelated
contours moved near the origin can match (F1 up), and a contour moved by an earlier non-matching
comparison can miss its true partner (F1 down). `f1_as_script` replays that: the same comparisons
in the same order on copies that are shifted as the script shifts them.

`example_*` figures add the example pipeline's two prediction steps to our mask before scoring:
the vote filter (a pixel needs more than one of the overlapping tiles; every tile's "prediction" is
a crop of our one stitched mask, so a pixel's votes are its tile coverage, counted per axis) and
the removal of 8-connected objects under 20,000 px. On a stitched mask the vote deletes every
region covered by one tile only, the slide's corners included: those figures say what the
example's pipeline would do to our mask, not how the challenge scores a submission.

Task 1 (patches, `Validation_patch_docker`): the mean over patches of Dice (the formula of the script's DiceMetric) of a
0.5-thresholded prediction against the min-max scaled mask; patches with an empty mask are left
out (MONAI's `ignore_empty`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from custom.metrics.dice import dice_score

TILE_PX = 2048
STRIDE_PX = 1024
MIN_OBJECT_PX = 20_000
IOU_THRESHOLD = 0.5
CROP_MARGIN_PX = 10  # the organisers' margin around the two contours' joint bounding box
NATIVE_20X_TAG = "NEP25"  # the script's test: this text anywhere in the path means no resampling
FOREGROUND = 255
SUBMITTED_THRESHOLD = 128  # zoomed 0..255 prediction; the script's sodelete keeps x * 255 > 127


def downsample_factor(path: str | Path | None) -> int:
    """1 when "NEP25" appears anywhere in the path (or class name), else 2: the script's 20X rule."""
    return 1 if path is not None and NATIVE_20X_TAG in str(path) else 2


@dataclass
class KPIsResult:
    dice: float
    precision: float
    recall: float
    f1: float
    f1_as_script: float
    n_pred: int
    n_gt: int
    example_dice: float
    example_precision: float
    example_recall: float
    example_f1: float
    example_n_pred: int

    def as_dict(self) -> dict:
        return asdict(self)

    def record(self, prefix: str = "kpis") -> dict:
        """Flat report keys: kpis_dice, ..., kpis_example_f1."""
        return {f"{prefix}_{k}": v for k, v in asdict(self).items()}


def iter_zoom_bands(source, factor: int, band_rows: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """(first output row, rows) of `scipy.ndimage.zoom(mask * 255, 1 / factor, order=1)`, band by band.

    `source` is a 2-D array or a mask slide (`.level_shapes`, `.read_region`); anything > 0 is
    foreground. Rows use scipy's coordinate map (grid_mode=False), so the bands put together equal
    the whole-array zoom while only about `band_rows` input rows are in memory at a time.
    """
    height, width = _shape(source)
    if factor == 1:
        for start in range(0, height, band_rows):
            yield start, _read_rows(source, start, min(band_rows, height - start), width)
        return
    out_h, out_w = round(height / factor), round(width / factor)
    r0, r1, fr = _linear_weights(height, out_h)
    c0, c1, fc = _linear_weights(width, out_w)
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
        yield start, np.floor(cols + 0.5).astype(np.uint8)


def zoom_order1(source, factor: int, band_rows: int = 4096) -> np.ndarray:
    """The whole zoomed mask (0..255 uint8) from `iter_zoom_bands`."""
    bands = [band for _, band in iter_zoom_bands(source, factor, band_rows)]
    return np.concatenate(bands) if bands else np.zeros((0, _shape(source)[1]), np.uint8)


def submitted_bands(pred, factor: int, band_rows: int = 4096) -> Iterator[tuple[int, np.ndarray]]:
    """The 20X binary mask a prediction is scored as (and exported as), band by band."""
    for start, band in iter_zoom_bands(pred, factor, band_rows):
        yield start, band >= SUBMITTED_THRESHOLD


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
    """Pixels of a binary map that collect more than one vote from the overlapping tiles.

    Every position is covered at least once per axis, so votes (rows x cols) exceed one exactly
    where either axis has two or more: a boolean broadcast instead of an integer vote image.
    """
    rows = axis_coverage(pred.shape[0], tile_px, stride_px) > 1
    cols = axis_coverage(pred.shape[1], tile_px, stride_px) > 1
    return (pred > 0) & (rows[:, None] | cols[None, :])


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
    """Geometric IoU of two filled contours, drawn on a canvas around both; the contours are untouched."""
    frame = _joint_frame(a, b)
    if frame is None:
        return 0.0
    offset, shape = frame
    return _filled_iou(a - offset, b - offset, shape)


def contour_iou_shifting(a: np.ndarray, b: np.ndarray) -> float:
    """The script's contour IoU, side effect included: both arrays are moved into the canvas in place."""
    frame = _joint_frame(a, b)
    if frame is None:
        return 0.0
    offset, shape = frame
    a -= offset
    b -= offset
    return _filled_iou(a, b, shape)


def detection_scores(
    pred_contours: list[np.ndarray], gt_contours: list[np.ndarray], iou_threshold: float = IOU_THRESHOLD
) -> tuple[float, float, float]:
    """(precision, recall, F1) by the script's matching rule, with the geometric IoU."""
    boxes = _boxes(gt_contours)
    hit = np.zeros((len(pred_contours), len(gt_contours)), bool)
    for i, p in enumerate(pred_contours):
        box = _boxes([p])[0]
        near = np.flatnonzero(_overlapping(box, boxes))  # the others have IoU 0 (the script's early exit)
        hit[i, near] = [contour_iou(p, gt_contours[j]) >= iou_threshold for j in near]
    tp = int(hit.any(axis=1).sum())
    fn = int((~hit.any(axis=0)).sum())
    return _scores(tp, len(pred_contours) - tp, fn)


def detection_scores_as_script(
    pred_contours: list[np.ndarray], gt_contours: list[np.ndarray], iou_threshold: float = IOU_THRESHOLD
) -> tuple[float, float, float]:
    """(precision, recall, F1) as the script computes them, contours shifted in place between calls.

    The script's order: each prediction against the truths until its first match, then each truth
    against the predictions until its first match (its `any` stops there). Runs on copies.
    """
    preds = [c.copy() for c in pred_contours]
    gts = [c.copy() for c in gt_contours]
    tp = sum(any(contour_iou_shifting(p, g) >= iou_threshold for g in gts) for p in preds)
    fn = sum(not any(contour_iou_shifting(p, g) >= iou_threshold for p in preds) for g in gts)
    return _scores(tp, len(preds) - tp, fn)


def score_binary(pred: np.ndarray, gt_small: np.ndarray, iou_threshold: float = IOU_THRESHOLD):
    """Dice, (precision, recall, F1) and both contour lists of a binary 20X mask against the zoomed
    0..255 truth, read as the script reads it (255 for Dice, > 0 for contours)."""
    dice = dice_score(pred, gt_small == FOREGROUND)
    pred_contours = object_contours(pred)
    gt_contours = object_contours(gt_small > 0)
    scores = detection_scores(pred_contours, gt_contours, iou_threshold)
    return dice, scores, pred_contours, gt_contours


def kpis_task2(
    pred,
    gt,
    factor: int = 2,
    tile_px: int = TILE_PX,
    stride_px: int = STRIDE_PX,
    min_object_px: int = MIN_OBJECT_PX,
    iou_threshold: float = IOU_THRESHOLD,
) -> KPIsResult:
    """Score one slide: the mask as submitted, and after the example pipeline's two extra steps.

    `pred` and `gt` are level-0 binary masks (anything > 0 is glomerulus), 2-D arrays or mask
    slides from `custom.wsi.reader.open_mask`; `factor` is `downsample_factor(path)`. The 20X masks
    are held in memory (one byte per pixel), as in the organisers' script.
    """
    if _shape(pred) != _shape(gt):
        raise ValueError(f"prediction {_shape(pred)} and ground truth {_shape(gt)} differ in shape")
    submitted = np.concatenate([band for _, band in submitted_bands(pred, factor)])
    gt_small = zoom_order1(gt, factor)
    dice, (precision, recall, f1), pred_contours, gt_contours = score_binary(
        submitted, gt_small, iou_threshold
    )
    f1_as_script = detection_scores_as_script(pred_contours, gt_contours, iou_threshold)[2]
    example = remove_small_components(vote_filter(submitted, tile_px, stride_px), min_object_px)
    del submitted
    ex_dice, ex_scores, ex_contours, _ = score_binary(example, gt_small, iou_threshold)
    return KPIsResult(
        dice, precision, recall, f1, f1_as_script, len(pred_contours), len(gt_contours),
        ex_dice, *ex_scores, len(ex_contours),
    )  # fmt: skip


def kpis_patch_dice(pred: np.ndarray, mask: np.ndarray) -> float:
    """Task-1 Dice of one patch: binary prediction against the min-max scaled mask; NaN if the mask is empty.

    The formula of the organisers' DiceMetric (MONAI 1.3), not MONAI 1.6's `compute_dice`: with one
    channel that one counts only truth pixels equal to 1, so a JPEG mask's soft edges (254/255) drop out.
    """
    y = mask.astype(np.float64)
    lo, hi = y.min(), y.max()
    y = (y - lo) / (hi - lo) if hi > lo else np.zeros_like(y)
    p = (pred >= 0.5).astype(np.float64)  # binary masks (0/1, bool) and probabilities alike
    y_sum = y.sum()
    if y_sum == 0:
        return float("nan")
    return float(2 * (p * y).sum() / (y_sum + p.sum()))


def kpis_task1(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean task-1 Dice over (prediction, mask) patches, leaving out patches with an empty mask."""
    scores = [kpis_patch_dice(p, m) for p, m in pairs]
    valid = [s for s in scores if not np.isnan(s)]
    return float(np.mean(valid)) if valid else float("nan")


def _scores(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def _boxes(contours: list[np.ndarray]) -> np.ndarray:
    """(n, 4) x0, x1, y0, y1 of each contour (inclusive)."""
    if not contours:
        return np.zeros((0, 4), np.int64)
    return np.array(
        [[c[:, 0, 0].min(), c[:, 0, 0].max(), c[:, 0, 1].min(), c[:, 0, 1].max()] for c in contours]
    )


def _overlapping(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Boxes that the script does not reject by its bounding-box test."""
    return ~(
        (box[1] < boxes[:, 0]) | (boxes[:, 1] < box[0]) | (box[3] < boxes[:, 2]) | (boxes[:, 3] < box[2])
    )


def _joint_frame(a: np.ndarray, b: np.ndarray):
    """(offset, canvas shape) of the script's crop around two contours, None when their boxes are apart."""
    box_a, box_b = _boxes([a])[0], _boxes([b])[0]
    if not _overlapping(box_a, box_b[None])[0]:
        return None
    x0, y0 = min(box_a[0], box_b[0]) - CROP_MARGIN_PX, min(box_a[2], box_b[2]) - CROP_MARGIN_PX
    x1, y1 = max(box_a[1], box_b[1]) + CROP_MARGIN_PX, max(box_a[3], box_b[3]) + CROP_MARGIN_PX
    return np.array([x0, y0], dtype=a.dtype), (int(y1 - y0), int(x1 - x0))


def _filled_iou(a: np.ndarray, b: np.ndarray, shape: tuple[int, int]) -> float:
    fill_a = np.zeros(shape, np.uint8)
    fill_b = np.zeros(shape, np.uint8)
    cv2.drawContours(fill_a, [a], -1, 1, -1)
    cv2.drawContours(fill_b, [b], -1, 1, -1)
    union = np.count_nonzero(fill_a | fill_b)
    return np.count_nonzero(fill_a & fill_b) / union if union else 0.0


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
