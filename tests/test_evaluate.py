"""Evaluation end to end: hand-made predictions beside synthetic ground truth, checked number by number."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image
from scipy import stats

from custom.errors import ConfigError
from custom.metrics.compare import compare
from custom.metrics.evaluate import evaluate_folders
from custom.metrics.instances import instance_scores
from custom.metrics.kpis import kpis_task2
from custom.metrics.patches import count_grid, patch_dice
from custom.outputs.pyramid import pyramid_shapes, write_pyramid
from custom.wsi.reader import open_mask

BUNDLE = Path(__file__).resolve().parents[1] / "holohisto_bundle"
MPP = 0.25  # the synthetic slides' level-0 pixel size
CELL_PX = 1024  # the small patch size asked for besides the default 4096


def _write_mask(path, level0: np.ndarray, mpp: float | None = MPP):
    """A pyramidal LZW mask from a level-0 array (reduced levels by striding, as a cheap pyramid)."""
    shapes = pyramid_shapes(*level0.shape)
    levels = [level0[:: 2**k, :: 2**k] for k in range(len(shapes))]
    write_pyramid(
        path,
        shapes,
        lambda level, y, x, h, w: levels[level][y : y + h, x : x + w],
        channels=1,
        mpp=mpp,
        compression="lzw",
    )


def _link(target, link):
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def _dice(p, g) -> float:
    p, g = p > 0, g > 0
    return 2 * np.count_nonzero(p & g) / (np.count_nonzero(p) + np.count_nonzero(g))


def _mean_patch_dice(p, g, patch_px) -> float:
    """The documented rule by brute force: every grid patch, both-empty patches left out."""
    scores = []
    for y in range(0, p.shape[0], patch_px):
        for x in range(0, p.shape[1], patch_px):
            pp, gg = p[y : y + patch_px, x : x + patch_px] > 0, g[y : y + patch_px, x : x + patch_px] > 0
            if pp.any() or gg.any():
                scores.append(_dice(pp, gg))
    return float(np.mean(scores))


@pytest.fixture(scope="module")
def evaluated(kpis_folder, tmp_path_factory):
    """GT: the three KPIs-layout slides, one also filed as NEP25, one truth with no prediction, two
    slides whose predictions are broken, one id with two truths; predictions: exact, one glomerulus
    removed, empty, and one with no truth."""
    root = tmp_path_factory.mktemp("evaluate")
    gt_dir, pred_dir, out_dir = root / "gt", root / "pred", root / "report"
    src = {sid: next(kpis_folder.rglob(f"{sid}_mask.tiff")) for sid in ("synth_21", "synth_22", "synth_23")}
    for sid, mask in src.items():
        for kind in ("mask", "wsi"):
            _link(mask.with_name(f"{sid}_{kind}.tiff"), gt_dir / mask.parent.name / f"{sid}_{kind}.tiff")
    _link(src["synth_21"], gt_dir / "NEP25" / "nep_21_mask.tiff")  # same masks, full-resolution class
    _link(src["synth_21"].with_name("synth_21_wsi.tiff"), gt_dir / "NEP25" / "nep_21_wsi.tiff")
    _link(src["synth_23"], gt_dir / "normal" / "synth_77_mask.tiff")  # truth without prediction
    _link(src["synth_21"], gt_dir / "DN" / "synth_55_mask.tiff")  # its prediction has the wrong size
    _link(src["synth_21"], gt_dir / "DN" / "synth_56_mask.tiff")  # its prediction is not a TIFF
    for cls in ("56Nx", "DN"):  # two truths for one slide id: ambiguous, not scored
        _link(src["synth_21"], gt_dir / cls / "dup_1_mask.tiff")

    truth = {sid: open_mask(path).read_level(0) for sid, path in src.items()}
    pred_dir.mkdir()
    shutil.copyfile(src["synth_21"], pred_dir / "synth_21_wsi_pred.tiff")
    shutil.copyfile(src["synth_21"], pred_dir / "nep_21_wsi_pred.tiff")
    labels, _ = ndi.label(truth["synth_22"] > 0, structure=np.ones((3, 3)))
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    removed = np.where(labels == largest, 0, truth["synth_22"]).astype(np.uint8)
    _write_mask(pred_dir / "synth_22_wsi_pred.tiff", removed)
    _write_mask(pred_dir / "synth_23_wsi_pred.tiff", np.zeros_like(truth["synth_23"]))
    shutil.copyfile(src["synth_23"], pred_dir / "synth_99_wsi_pred.tiff")  # no truth anywhere
    _write_mask(pred_dir / "synth_55_wsi_pred.tiff", np.zeros((2048, 2048), np.uint8))
    (pred_dir / "synth_56_wsi_pred.tiff").write_bytes(b"not a tiff at all")
    shutil.copyfile(src["synth_21"], pred_dir / "dup_1_wsi_pred.tiff")

    report = evaluate_folders(pred_dir, gt_dir, out_dir, patch_sizes=(CELL_PX, 4096), progress=False)
    preds = {"synth_21": truth["synth_21"], "synth_22": removed, "synth_23": np.zeros_like(truth["synth_23"])}
    return report, out_dir, truth, preds


def _slides(report) -> dict:
    return {s["slide"]: s for s in report["slides"]}


def test_exact_prediction_scores_one_and_empty_prediction_zero(evaluated):
    report = evaluated[0]
    s = _slides(report)
    exact, empty = s["synth_21"], s["synth_23"]
    for key in ("wsi_dice", "patch_dice", f"patch_dice_{CELL_PX}", "instance_f1"):
        assert exact[key] == 1.0 and empty[key] == 0.0, key
    assert exact["count_error"] == 0 and exact["instance_n_pred"] == exact["instance_n_gt"] > 0
    assert empty["instance_n_pred"] == 0 and empty["count_error"] == -empty["instance_n_gt"]
    # 4096 patches on a 4096 x 3072 slide: one patch, so patch Dice is the slide's Dice
    assert exact[f"patches_scored_{4096}"] == 1 and exact["patch_grid"] == "tissue patches"


def test_removed_glomerulus_lowers_dice_recall_and_count_by_the_right_amounts(evaluated):
    report, _, truth, preds = evaluated
    s = _slides(report)["synth_22"]
    gt, pred = truth["synth_22"], preds["synth_22"]
    assert s["wsi_dice"] == pytest.approx(_dice(pred, gt), abs=1e-12)
    assert s[f"patch_dice_{CELL_PX}"] == pytest.approx(_mean_patch_dice(pred, gt, CELL_PX), abs=1e-12)
    assert s[f"patch_dice_{CELL_PX}"] < 1.0
    # objects on the centre-sampled 2-um/px masks (factor 8 at 0.25 um/px), as documented
    expected = instance_scores(pred[4::8, 4::8] > 0, gt[4::8, 4::8] > 0)
    assert (s["instance_n_pred"], s["instance_n_gt"]) == (expected.n_pred, expected.n_gt)
    assert s["count_error"] == -1 and s["instance_precision"] == 1.0
    assert s["instance_recall"] == pytest.approx((expected.n_gt - 1) / expected.n_gt)
    assert (s["instance_downsample"], s["instance_um_per_px"]) == (8, 2.0)


def test_kpis_figures_score_the_mask_as_submitted_and_the_example_pipeline_beside_it(evaluated):
    report, _, truth, _ = evaluated
    s = _slides(report)
    gt = truth["synth_21"]
    full, halved = kpis_task2(gt, gt, 1), kpis_task2(gt, gt, 2)
    # The same exact prediction: under NEP25/ it is scored at full resolution, elsewhere at half
    for sid, expected, factor in (("nep_21", full, 1), ("synth_21", halved, 2)):
        assert {k: s[sid][k] for k in expected.record()} == pytest.approx(expected.record()), sid
        assert s[sid]["kpis_downsample"] == factor
    # as submitted, an exact prediction scores as one; the example pipeline's vote needs two tiles,
    # and a 2048 x 1536 half-resolution slide is one 2048-px tile per axis, so it keeps nothing
    assert halved.dice > 0.95 and halved.f1 == 1.0 and halved.n_pred == halved.n_gt > 0
    assert halved.example_dice == 0.0 and halved.example_n_pred == 0
    assert full.dice == 1.0 and full.example_dice > 0.5
    assert s["nep_21"]["class"] == "NEP25" and s["synth_23"]["class"] == "DN"


def test_summary_is_by_class_in_kpis_order_and_errors_name_each_bad_slide(evaluated):
    report, _, _, _ = evaluated
    s = _slides(report)
    assert list(report["summary"]) == ["56Nx", "DN", "NEP25", "all"]
    assert report["summary"]["56Nx"]["n_slides"] == 2 and report["summary"]["all"]["n_slides"] == 4
    assert report["summary"]["56Nx"]["wsi_dice"] == pytest.approx(
        (s["synth_21"]["wsi_dice"] + s["synth_22"]["wsi_dice"]) / 2
    )
    assert report["summary"]["all"]["count_abs_error"] == pytest.approx(
        np.mean([abs(r["count_error"]) for r in report["slides"]])
    )
    errors = {e["slide"]: e for e in report["errors"]}
    assert len(report["errors"]) == len(errors) == 5
    assert sorted(errors) == ["dup_1", "synth_55", "synth_56", "synth_77", "synth_99"]
    assert errors["dup_1"]["error"].startswith("2 ground truths for one slide, not scored")
    assert errors["synth_99"]["error"].startswith("no ground truth")
    assert (
        errors["synth_77"]["error"].startswith("no prediction") and errors["synth_77"]["prediction"] is None
    )
    assert "2048 x 2048" in errors["synth_55"]["error"] and "4096" in errors["synth_55"]["error"]
    assert errors["synth_56"]["prediction"].endswith("synth_56_wsi_pred.tiff")


def test_report_files_hold_the_same_numbers(evaluated):
    report, out_dir, _, _ = evaluated
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "dice_per_slide.png",
        "metrics.json",
        "per_slide.csv",
        "summary.md",
    ]  # and no half-written temporary left behind
    saved = json.loads((out_dir / "metrics.json").read_text())
    assert saved["slides"] == report["slides"] and saved["summary"] == report["summary"]
    for record in saved["slides"]:
        for key in (
            "slide", "class", "patch_dice", "wsi_dice", "kpis_dice", "kpis_precision", "kpis_recall",
            "kpis_f1_as_script", "kpis_example_dice", "kpis_example_f1",
        ):  # fmt: skip
            assert key in record
    with open(out_dir / "per_slide.csv", newline="") as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(_slides(report))
    for sid, record in _slides(report).items():
        assert float(rows[sid]["wsi_dice"]) == record["wsi_dice"]
        assert float(rows[sid]["kpis_f1"]) == record["kpis_f1"]
    md = (out_dir / "summary.md").read_text()
    all_row = next(line for line in md.splitlines() if line.startswith("| all |"))
    assert all_row.startswith(f"| all | 4 | {report['summary']['all'][f'patch_dice_{CELL_PX}']:.4f} |")
    assert f"{report['summary']['all']['wsi_dice']:.4f}" in all_row
    assert "## Errors (5)" in md and "`synth_99`: no ground truth" in md
    with Image.open(out_dir / "dice_per_slide.png") as png:
        assert png.format == "PNG" and png.size[0] >= 600


def test_streaming_wsi_dice_equals_numpy_dice_across_block_seams(kpis_folder):
    gt_path = next(kpis_folder.rglob("synth_22_mask.tiff"))
    gt = open_mask(gt_path).read_level(0)
    pred = np.roll(gt, (37, -53), axis=(0, 1))  # objects move across block seams
    expected = _dice(pred, gt)
    # blocks of 1000 px (rounded up to whole 500-px cells): 12 blocks over 4096 x 3072
    cells = count_grid(pred, open_mask(gt_path), cell_px=500, block_px=1000)
    assert cells.total().mean() == pytest.approx(expected, abs=1e-12)
    assert count_grid(pred, gt, cell_px=4096).total().mean() == pytest.approx(expected, abs=1e-12)


def test_patch_dice_leaves_out_empty_patches_and_scores_one_sided_ones_zero():
    gt = np.zeros((8, 12), np.uint8)
    pred = np.zeros_like(gt)
    gt[0:2, 0:2] = pred[0:2, 0:2] = 1  # patch (0, 0): exact -> 1
    gt[0:2, 4:6] = 1  # patch (0, 1): 4 true px ...
    pred[0:1, 4:6] = 1  # ... 2 predicted, both right -> 2*2 / (4 + 2) = 2/3
    pred[5, 0:3] = 1  # patch (1, 0): 3 false-positive px, no truth -> 0
    gt[6, 5:7] = 1  # patch (1, 1): 2 true px missed -> 0
    pred[6, 9] = 1  # patch (1, 2): a false positive on glass, outside the tissue patches
    tissue = np.array([[True, True, True], [True, True, False]])
    result = patch_dice(count_grid(pred, gt, cell_px=4, block_px=4), tissue)
    # patch (0, 2) is tissue but empty in both masks: not in the mean
    assert result.mean == pytest.approx((1 + 2 / 3 + 0 + 0) / 4)
    assert (result.scored, result.empty, result.tissue) == (4, 1, 5)
    assert np.isnan(result.scores[0, 2]) and np.isnan(result.scores[1, 2])
    # 8-px patches, every patch eligible: the left one pools 4 cells: tp 6, pred 9, truth 10
    coarse = patch_dice(count_grid(pred, gt, cell_px=4).coarsen(8))
    assert coarse.mean == pytest.approx((12 / 19 + 0) / 2)
    assert patch_dice(count_grid(np.zeros_like(gt), np.zeros_like(gt), cell_px=4)).scored == 0


@pytest.fixture(scope="module")
def multiclass_dirs(tmp_path_factory):
    """A 3-label pair without slide image: label 1 exact, label 2 half right, half called label 1."""
    root = tmp_path_factory.mktemp("multiclass")
    gt = np.zeros((1024, 1024), np.uint8)
    gt[100:200, 100:200] = 1  # A: 10,000 px of label 1
    gt[500:600, 500:600] = 2  # B: 10,000 px of label 2
    pred = gt.copy()
    pred[500:600, 550:600] = 1  # half of B called label 1
    (root / "gt").mkdir()
    (root / "pred").mkdir()
    _write_mask(root / "gt" / "case_1_mask.tiff", gt)
    _write_mask(root / "pred" / "case_1_wsi_pred.tiff", pred)
    return root


def _check_multiclass(slide: dict) -> None:
    # label 1: pred 15,000, truth 10,000, overlap 10,000 -> 0.8; label 2: 5,000 / 10,000 / 5,000 -> 2/3
    assert slide["dice_label_1"] == pytest.approx(0.8)
    assert slide["dice_label_2"] == pytest.approx(2 / 3)
    assert slide["wsi_dice"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert slide["patch_dice"] == pytest.approx((0.8 + 2 / 3) / 2)  # one 1024-px patch, both labels in it
    assert slide["instance_f1"] == 1.0  # objects are any label > 0: A and B, both found
    assert slide["patch_grid"].startswith("all patches")


def test_multiclass_masks_get_dice_per_label_and_their_mean(multiclass_dirs, tmp_path):
    report = evaluate_folders(
        multiclass_dirs / "pred",
        multiclass_dirs / "gt",
        tmp_path,
        patch_sizes=1024,
        num_classes=3,
        progress=False,
    )
    _check_multiclass(report["slides"][0])
    assert "## Per label (whole slide)" in (tmp_path / "summary.md").read_text()


def test_bundle_config_evaluates_from_the_bundle_root(multiclass_dirs, tmp_path):
    args = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/evaluate.json",
        "--pred_dir", str(multiclass_dirs / "pred"), "--gt_dir", str(multiclass_dirs / "gt"),
        "--output_dir", str(tmp_path), "--num_classes", "3", "--patch_sizes", "[1024]", "--progress", "False",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    _check_multiclass(saved["slides"][0])
    assert saved["settings"]["patch_sizes_px"] == [1024] and saved["errors"] == []


def _metrics_file(path, values: dict) -> None:
    slides = [{"slide": sid, "class": "DN", "wsi_dice": v} for sid, v in values.items()]
    path.write_text(json.dumps({"slides": slides, "summary": {}, "errors": []}))


def test_compare_pairs_slides_by_id_and_gives_scipys_wilcoxon_p(tmp_path):
    a = {"s1": 0.91, "s2": 0.85, "s3": 0.88, "s4": 0.93, "s5": 0.79, "s6": 0.90, "s7": 0.87, "only_a": 0.5}
    b = {"s7": 0.88, "s6": 0.85, "s5": 0.70, "s4": 0.92, "s3": 0.86, "s2": 0.80, "s1": 0.89, "s8": None}
    _metrics_file(tmp_path / "a.json", a)
    (tmp_path / "b").mkdir()
    _metrics_file(tmp_path / "b" / "metrics.json", b)
    result = compare(tmp_path / "a.json", tmp_path / "b", key="wsi_dice")
    ids = [f"s{i}" for i in range(1, 8)]
    expected = stats.wilcoxon([a[i] for i in ids], [b[i] for i in ids]).pvalue
    assert result["p_value"] == pytest.approx(expected) and 0 < result["p_value"] < 0.1
    assert (result["n_pairs"], result["a_better"], result["b_better"]) == (7, 6, 1)
    assert result["only_in_a"] == ["only_a"] and result["only_in_b"] == ["s8"]
    assert result["mean_difference"] == pytest.approx(np.mean([a[i] - b[i] for i in ids]))
    with pytest.raises(ConfigError, match="no per-slide figure named 'kpis_f2'"):
        compare(tmp_path / "a.json", tmp_path / "b", key="kpis_f2")


def test_prediction_folder_without_predictions_is_a_user_error(tmp_path):
    (tmp_path / "gt").mkdir()
    _write_mask(tmp_path / "gt" / "x_mask.tiff", np.zeros((256, 256), np.uint8))
    with pytest.raises(ConfigError, match=r"no <stem>_pred\.tiff predictions found"):
        evaluate_folders(tmp_path, tmp_path / "gt", tmp_path / "out", progress=False)
