"""Metrics pinned by hand-computed cases (the expected numbers are worked out in each test)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi

from custom.metrics import kpis
from custom.metrics.dice import DiceCounts, MultiClassDice, dice_score
from custom.metrics.instances import instance_scores
from custom.metrics.stats import wilcoxon_p

# Scaled-down protocol geometry so each case fits in a 16 x 16 mask: tiles of 8 px every 4 px.
# Origins are 0, 4, 8 on both axes, so coverage per axis is 1,1,1,1,2,...,2,1,1,1,1 and the
# 4 x 4 corners get a single vote while the centre gets four.
TILE, STRIDE = 8, 4


def test_dice_counts_accumulate_tiles_to_the_whole_array_dice():
    rng = np.random.default_rng(0)
    pred = rng.random((64, 64)) > 0.5
    gt = rng.random((64, 64)) > 0.4
    counts = DiceCounts()
    for top in range(0, 64, 16):
        counts.add(pred[top : top + 16], gt[top : top + 16])
    expected = 2 * np.sum(pred & gt) / (pred.sum() + gt.sum())
    assert counts.dice() == pytest.approx(expected)
    assert dice_score(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0


def test_multiclass_dice_scores_each_class_and_averages():
    gt = np.array([[0, 1, 1, 2], [0, 1, 2, 2]])
    pred = np.array([[0, 1, 0, 2], [0, 1, 2, 1]])
    scores = MultiClassDice(num_classes=3)
    scores.add(pred, gt)
    # class 1: pred 3 px, gt 3 px, overlap 2 -> 4/6; class 2: pred 2, gt 3, overlap 2 -> 4/5
    assert scores.per_class() == pytest.approx({1: 4 / 6, 2: 4 / 5})
    assert scores.mean() == pytest.approx((4 / 6 + 4 / 5) / 2)


def test_kpis_tile_origins_follow_the_official_formula():
    # int((L - 2048) / 1024) + 1 tiles, every 1024 px, the last one moved flush to the edge
    assert kpis.tile_origins(5000) == [0, 1024, 5000 - 2048]
    assert kpis.tile_origins(4096) == [0, 1024, 2048]
    assert kpis.tile_origins(16, TILE, STRIDE) == [0, 4, 8]
    assert list(kpis.axis_coverage(16, TILE, STRIDE)) == [1] * 4 + [2] * 8 + [1] * 4


def test_kpis_both_masks_empty_gives_dice_one_and_f1_zero():
    empty = np.zeros((16, 16), np.uint8)
    result = kpis.kpis_task2(empty, empty, 1, TILE, STRIDE, min_object_px=1)
    # Dice is defined as 1.0 for two empty masks; the organisers' F1 divides 0 by 0 and reports 0.
    assert (result.dice, result.precision, result.recall, result.f1, result.f1_as_script) == (1, 0, 0, 0, 0)
    assert (result.example_dice, result.example_f1) == (1.0, 0.0)


def test_kpis_empty_prediction_scores_zero():
    gt = np.zeros((16, 16), np.uint8)
    gt[5:9, 5:9] = 255
    result = kpis.kpis_task2(np.zeros_like(gt), gt, 1, TILE, STRIDE, min_object_px=1)
    # no predicted pixel: Dice = 0 / 16; no prediction contour: precision 0, the one gt missed: recall 0
    assert (result.dice, result.precision, result.recall, result.f1) == (0.0, 0.0, 0.0, 0.0)
    assert (result.n_pred, result.n_gt) == (0, 1)


def test_kpis_small_objects_are_removed_only_in_the_example_figures():
    pred = np.zeros((16, 16), np.uint8)
    pred[4:7, 4:7] = 1  # 9 px, kept (min 5)
    pred[10, 10] = 1  # 1 px, in the 4-vote centre, removed by the example's 5-px removal
    gt = np.zeros_like(pred)
    gt[4:7, 4:7] = 1
    result = kpis.kpis_task2(pred, gt, 1, TILE, STRIDE, min_object_px=5)
    # as submitted the stray pixel stays: Dice 2*9/(10+9); a second object matching nothing: P 1/2
    assert result.dice == pytest.approx(18 / 19)
    assert (result.precision, result.recall, result.n_pred) == (0.5, 1.0, 2)
    assert result.f1 == pytest.approx(2 * 0.5 / 1.5)
    # the example pipeline's removal leaves the masks identical
    assert (result.example_dice, result.example_precision, result.example_recall) == (1.0, 1.0, 1.0)
    assert result.example_n_pred == 1


def test_kpis_corner_object_counts_as_submitted_and_is_dropped_by_the_example_vote():
    pred = np.zeros((16, 16), np.uint8)
    pred[1:3, 1:3] = 1  # top-left corner: covered by one tile -> 1 vote
    pred[1:3, 6:8] = 1  # top edge, middle columns: two tiles -> 2 votes
    gt = pred.copy()
    result = kpis.kpis_task2(pred, gt, 1, TILE, STRIDE, min_object_px=1)
    # scored as submitted, the correct corner object is found like any other
    assert (result.dice, result.precision, result.recall, result.f1) == (1.0, 1.0, 1.0, 1.0)
    assert (result.n_pred, result.n_gt) == (2, 2)
    # the example's vote keeps 4 of the 8 true pixels: Dice 2*4/(4+8); one of two objects found
    assert result.example_dice == pytest.approx(8 / 12)
    assert (result.example_n_pred, result.example_precision, result.example_recall) == (1, 1.0, 0.5)
    assert result.example_f1 == pytest.approx(2 / 3)


def test_kpis_vote_filter_equals_counting_every_tile():
    rng = np.random.default_rng(4)
    pred = rng.random((40, 52)) > 0.5
    votes = np.zeros(pred.shape, np.int32)
    for y in kpis.tile_origins(40, TILE, STRIDE):
        for x in kpis.tile_origins(52, TILE, STRIDE):
            votes[y : y + TILE, x : x + TILE] += pred[y : y + TILE, x : x + TILE]
    assert np.array_equal(kpis.vote_filter(pred, TILE, STRIDE), votes > 1)


def test_kpis_f1_as_script_replays_the_in_place_contour_shift():
    gt = np.zeros((200, 200), np.uint8)
    gt[10:30, 10:30] = 255  # G1
    gt[100:120, 100:120] = 255  # G2, the same shape elsewhere
    pred = np.zeros_like(gt)
    pred[10:30, 10:30] = 1  # P1: exactly G1
    pred[107:112, 107:112] = 1  # P2: a speck inside G2 (IoU ~0.05), G2 itself is missed
    result = kpis.kpis_task2(pred, gt, 1, min_object_px=1)
    # geometric: P1 matches G1, P2 matches nothing, G2 is missed: P = R = 1/2
    assert (result.precision, result.recall, result.f1) == (0.5, 0.5, 0.5)
    # the script: P1 vs G1 moves both to the canvas origin; P2 vs G2 (no match) moves G2 there too,
    # where it lies exactly on the moved P1, so G2 counts as found: P 1/2, R 1, F1 2/3
    assert result.f1_as_script == pytest.approx(2 / 3)
    preds, gts = kpis.object_contours(pred), kpis.object_contours(gt)
    before = [c.copy() for c in preds + gts]
    assert kpis.detection_scores_as_script(preds, gts) == pytest.approx((0.5, 1.0, 2 / 3))
    assert all(np.array_equal(a, b) for a, b in zip(before, preds + gts, strict=True))  # on copies


def test_kpis_f1_as_script_can_also_lose_a_true_match():
    gt = np.zeros((400, 400), np.uint8)
    gt[325:330, 200:330] = 255  # G1: an L whose bounding box overlaps G2's ...
    gt[250:330, 325:330] = 255
    gt[240:260, 220:240] = 255  # ... G2
    pred = np.zeros_like(gt)
    pred[240:260, 220:240] = 1  # P: exactly G2
    gts = kpis.object_contours(gt)
    assert kpis._boxes(gts[:1]).tolist() == [[199, 330, 249, 330]]  # OpenCV lists G1 first
    result = kpis.kpis_task2(pred, gt, 1, min_object_px=1)
    # geometric: P matches G2, G1 is missed: P 1, R 1/2
    assert (result.precision, result.recall) == (1.0, 0.5) and result.f1 == pytest.approx(2 / 3)
    # the script compares P with G1 first (boxes overlap, IoU 0), which moves P ~200 px towards the
    # origin; then P's box no longer meets G2's, so nothing matches at all
    assert result.f1_as_script == 0.0


def test_kpis_resampling_matches_scipy_zoom_band_by_band():
    rng = np.random.default_rng(1)
    mask = (ndi.gaussian_filter(rng.random((101, 77)), 3) > 0.5).astype(np.uint8)

    class BandedMask:  # reads like a mask slide, so zoom_order1 has to stitch bands
        level_shapes = (mask.shape,)

        def read_region(self, location, size, level=0):
            return mask[location[0] : location[0] + size[0], location[1] : location[1] + size[1]]

    expected = ndi.zoom(mask * 255, 0.5, order=1)
    assert np.array_equal(kpis.zoom_order1(BandedMask(), 2, band_rows=10), expected)
    assert np.array_equal(kpis.zoom_order1(BandedMask(), 1, band_rows=10), mask * 255)


def test_kpis_class_is_read_from_the_path_as_the_script_reads_it():
    # "NEP25" anywhere in the path means native 20X (no resampling); anything else is halved
    assert kpis.downsample_factor("/data/KPIs/NEP25/img/08_368_01_wsi.tiff") == 1
    assert kpis.downsample_factor("/data/val/NEP25_08_368_01_mask.tiff") == 1
    assert kpis.downsample_factor("NEP25") == 1
    for path in ("/data/KPIs/56Nx/12_116_mask.tiff", "/data/KPIs/56NX/img/12_116.tiff", "nep25/x", None):
        assert kpis.downsample_factor(path) == 2


def test_kpis_ground_truth_counts_only_fully_foreground_pixels_after_zoom():
    gt = np.zeros((32, 32), np.uint8)
    gt[9:21, 9:21] = 1  # edges between resampling points, so the zoom leaves partial values
    zoomed = ndi.zoom(gt * 255, 0.5, order=1)
    # the organisers cast the zoomed mask (read back as 0..1 floats) to int8: only 255 survives
    strict = zoomed == 255
    assert 0 < strict.sum() < (zoomed > 0).sum()
    pred = np.repeat(np.repeat(strict, 2, axis=0), 2, axis=1).astype(np.uint8)
    result = kpis.kpis_task2(pred, gt, 2, TILE, STRIDE, min_object_px=1)
    assert result.dice == pytest.approx(1.0)


def test_kpis_task1_mean_dice_skips_empty_masks():
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    pred = np.zeros((8, 8), np.float32)
    pred[2:6, 2:4] = 0.9  # half the object above threshold, 0.4 elsewhere below it
    pred[2:6, 4:6] = 0.4
    # Dice = 2*8/(16+8) = 2/3; the empty-mask patch is NaN and left out of the mean
    assert kpis.kpis_patch_dice(pred, mask) == pytest.approx(2 / 3)
    assert kpis.kpis_task1([(pred, mask), (pred, np.zeros_like(mask))]) == pytest.approx(2 / 3)


def test_instance_scores_match_objects_one_to_one_at_iou_half():
    gt = np.zeros((40, 40), np.uint8)
    gt[2:10, 2:10] = 1  # A: 64 px
    gt[20:30, 20:30] = 1  # B: 100 px
    pred = np.zeros_like(gt)
    pred[2:10, 3:11] = 1  # overlaps A by 56 px: IoU 56 / 72 = 0.78 -> match
    pred[20:30, 26:36] = 1  # overlaps B by 40 px: IoU 40 / 160 = 0.25 -> no match
    pred[35:38, 35:38] = 1  # a stray object
    s = instance_scores(pred, gt)
    assert (s.n_pred, s.n_gt, s.tp, s.fp, s.fn, s.count_error) == (3, 2, 1, 2, 1, 1)
    assert (s.precision, s.recall) == pytest.approx((1 / 3, 1 / 2))
    assert s.f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))


def test_wilcoxon_p_value_is_scipys_and_nan_when_nothing_differs():
    a = [0.91, 0.85, 0.88, 0.93, 0.79, 0.90, 0.87]
    b = [0.89, 0.80, 0.86, 0.92, 0.70, 0.85, 0.88]
    # 6 of 7 differences favour a; the exact two-sided p for ranks of |d| = .02,.05,.02,.01,.09,.05,.01
    from scipy import stats

    assert wilcoxon_p(a, b) == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert 0 < wilcoxon_p(a, b) < 0.1
    assert np.isnan(wilcoxon_p(a, a))
