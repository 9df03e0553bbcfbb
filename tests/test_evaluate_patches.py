"""KPIs task-1 scoring from `python -m custom evaluate`: JPEG patches and PNG predictions on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from custom.cli import main
from custom.metrics.evaluate_patches import patch_id, read_prediction
from custom.metrics.kpis import kpis_patch_dice

SIDE = 256  # the real patches are 2048 px; the protocol does not depend on the size


def _disc(cy, cx, r):
    yy, xx = np.mgrid[:SIDE, :SIDE]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _save(path, array, quality=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **({"quality": quality} if quality else {}))


@pytest.fixture(scope="module")
def task1(tmp_path_factory):
    """Four patches in the README's layout and spelling; predictions in three naming styles."""
    root = tmp_path_factory.mktemp("task1")
    gt, pred = root / "gt", root / "pred"
    masks = {
        ("56NX", "case1", "p1"): _disc(128, 128, 60),
        ("56NX", "case1", "p2"): _disc(80, 80, 40),
        ("DN", "case2", "p3"): np.zeros((SIDE, SIDE), bool),  # empty mask: left out
        ("DN", "case2", "p4"): _disc(100, 150, 50),  # its prediction is missing
        ("DN", "case2", "p5"): _disc(100, 150, 50),  # its prediction has the wrong size
    }
    for (cls, case, name), mask in masks.items():
        _save(gt / cls / case / "img" / f"{name}_img.jpg", np.full((SIDE, SIDE, 3), 200, np.uint8))
        _save(gt / cls / case / "mask" / f"{name}_mask.jpg", mask.astype(np.uint8) * 255, quality=90)
    half = masks[("56NX", "case1", "p2")].copy()
    half[:, 80:] = False
    _save(pred / "p1_pred.png", masks[("56NX", "case1", "p1")].astype(np.uint8) * 255)  # 0/255
    _save(pred / "56NX" / "val_p2_img.jpg_pred.png", half.astype(np.uint8))  # the validator's name, 0/1
    _save(pred / "p3_img_pred.png", _disc(50, 50, 10).astype(np.uint8) * 255)  # false positive, empty mask
    _save(pred / "p5_pred.png", np.zeros((SIDE // 2, SIDE // 2), np.uint8))
    _save(pred / "p9_pred.png", np.zeros((SIDE, SIDE), np.uint8))  # no patch of that name
    with pytest.raises(SystemExit) as info:
        main(["evaluate", str(pred), str(gt), "--out", str(root / "report")])
    report = json.loads((root / "report" / "metrics.json").read_text())
    return info.value.code, report, gt, pred, root / "report"


def test_task1_folder_is_scored_patch_by_patch_with_the_challenge_dice(task1):
    code, report, gt, pred, _ = task1
    assert code == 1  # errors are listed and end the command non-zero
    slides = {s["slide"]: s for s in report["slides"]}
    assert sorted(slides) == ["p1", "p2", "p3"]
    for pid, cls, prediction in (
        ("p1", "56NX", "p1_pred.png"),
        ("p2", "56NX", "56NX/val_p2_img.jpg_pred.png"),
    ):
        mask = np.asarray(Image.open(gt / cls / "case1" / "mask" / f"{pid}_mask.jpg").convert("L"))
        expected = kpis_patch_dice(read_prediction(pred / prediction), mask)
        assert slides[pid]["kpis_task1_dice"] == pytest.approx(expected)
    assert slides["p1"]["kpis_task1_dice"] > 0.99 and 0.4 < slides["p2"]["kpis_task1_dice"] < 0.8
    assert slides["p3"]["kpis_task1_dice"] is None  # empty mask: NaN, left out, false positive unseen
    assert slides["p1"]["class"] == "56Nx" and slides["p1"]["case"] == "case1"  # one spelling per class
    summary = report["summary"]
    assert summary["56Nx"]["kpis_task1_dice"] == pytest.approx(
        (slides["p1"]["kpis_task1_dice"] + slides["p2"]["kpis_task1_dice"]) / 2
    )
    assert summary["all"]["kpis_n_scored"] == 2 and summary["DN"].get("kpis_task1_dice") is None
    errors = {e["slide"]: e["error"] for e in report["errors"]}
    assert sorted(errors) == ["p4", "p5", "p9"]
    assert errors["p4"].startswith("no prediction") and errors["p9"].startswith("no ground truth")
    assert "128 x 128 px but its mask p5_mask.jpg is 256 x 256 px" in errors["p5"]


def test_task1_report_files_say_what_was_scored(task1):
    report_dir = task1[4]
    md = (report_dir / "summary.md").read_text()
    assert md.startswith("# KPIs task-1 evaluation: 3 patch(es)")
    assert "| all | 3 | 2 |" in md and "## Errors (3)" in md
    assert (
        (report_dir / "per_slide.csv")
        .read_text()
        .splitlines()[0]
        .startswith("slide,class,case,kpis_task1_dice")
    )


def test_prediction_names_pair_with_their_patch():
    assert patch_id("case1_3_pred.png") == "case1_3"
    assert patch_id("case1_3_img_pred.tif") == "case1_3"
    assert patch_id("val_case1_3_img.jpg_pred.png") == "case1_3"
    assert patch_id("case1_3_pred.txt") is None and patch_id("case1_3.png") is None
