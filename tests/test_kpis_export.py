"""The 20X export for the KPIs challenge: real files from the synthetic KPIs folder, through the CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image

from custom.cli import main
from custom.metrics import kpis
from custom.wsi.reader import open_mask


@pytest.fixture(scope="module")
def exported(kpis_folder, tmp_path_factory):
    """GT in the README's layout and spelling (56NX/mask/, NEP25/mask/); predictions: the truths
    themselves, a shifted one, and one slide with no truth."""
    root = tmp_path_factory.mktemp("export")
    gt_dir, pred_dir, out = root / "gt", root / "pred", root / "out"
    src21 = next(kpis_folder.rglob("synth_21_mask.tiff"))
    src22 = next(kpis_folder.rglob("synth_22_mask.tiff"))
    for cls, sid, src in (
        ("56NX", "synth_21", src21),
        ("NEP25", "nep_21", src21),
        ("56NX", "synth_22", src22),
    ):
        (gt_dir / cls / "mask").mkdir(parents=True, exist_ok=True)
        (gt_dir / cls / "mask" / f"{sid}_mask.tiff").symlink_to(src)
    pred_dir.mkdir()
    for sid in ("synth_21", "nep_21", "synth_99"):
        shutil.copyfile(src21, pred_dir / f"{sid}_wsi_pred.tiff")
    shutil.copyfile(src22, pred_dir / "synth_22_wsi_pred.tiff")
    with pytest.raises(SystemExit) as info:
        main(["kpis-export", str(pred_dir), str(out), "--gt", str(gt_dir), "--masks"])
    return info.value.code, out, open_mask(src21).read_level(0)


def _png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


def test_export_names_masks_as_the_challenge_example_at_20x(exported):
    code, out, gt = exported
    assert code == 1  # synth_99 has no ground truth: reported, the others written
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert names == [
        "56NX/mask/synth_21_mask.png", "56NX/mask/synth_22_mask.png", "56NX/pred/synth_21_pred_final.png",
        "56NX/pred/synth_22_pred_final.png", "NEP25/mask/nep_21_mask.png", "NEP25/pred/nep_21_pred_final.png",
    ]  # fmt: skip
    halved = _png(out / "56NX" / "pred" / "synth_21_pred_final.png")
    native = _png(out / "NEP25" / "pred" / "nep_21_pred_final.png")
    assert halved.shape == (1536, 2048) and native.shape == gt.shape == (3072, 4096)
    # 20X by the script's order-1 zoom, thresholded at half: 0/255 so matplotlib reads 1.0 as foreground
    zoomed = ndi.zoom((gt > 0).astype(np.uint8) * 255, 0.5, order=1)
    assert np.array_equal(halved, np.where(zoomed >= 128, 255, 0))
    assert np.array_equal(native, np.where(gt > 0, 255, 0))
    # the ground truth as the script zooms it, for its own scoring stage
    assert np.array_equal(_png(out / "56NX" / "mask" / "synth_21_mask.png"), zoomed)
    with Image.open(out / "56NX" / "pred" / "synth_21_pred_final.png") as image:
        assert image.info["dpi"][0] == pytest.approx(25_400 / 0.5, rel=1e-3)  # 20X: 0.5 um/px


def test_exported_mask_is_the_mask_evaluate_scores(exported, kpis_folder):
    _, out, _ = exported
    gt = open_mask(next(kpis_folder.rglob("synth_22_mask.tiff")))
    exported_mask = _png(out / "56NX" / "pred" / "synth_22_pred_final.png") > 0
    dice, (precision, recall, f1), _, _ = kpis.score_binary(exported_mask, kpis.zoom_order1(gt, 2))
    expected = kpis.kpis_task2(gt, gt, 2)
    assert (dice, precision, recall, f1) == (expected.dice, expected.precision, expected.recall, expected.f1)


def test_export_without_predictions_is_a_one_line_user_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["kpis-export", str(tmp_path), str(tmp_path / "out")])
    assert info.value.code == 2
    assert "no <stem>_pred.tiff predictions found" in capsys.readouterr().err
