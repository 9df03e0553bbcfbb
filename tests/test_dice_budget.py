"""benchmarks/dice_budget.py on a real synthetic decoy slide: the errors land in the right share."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from custom.synth import write_synthetic_slides

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from dice_budget import dice, line, slide_counts


@pytest.fixture(scope="module")
def decoys(tmp_path_factory):
    """Truth (decoys 0 in the mask) and the same slide's mask with its decoys marked 2."""
    root = tmp_path_factory.mktemp("budget")
    kwargs = dict(count=1, width=8192, height=4096, seed=3, decoys=True, progress=False)
    (truth,) = write_synthetic_slides(root / "truth", **kwargs)
    (marked,) = write_synthetic_slides(root / "marked", decoy_value=2, **kwargs)
    return root, truth, marked


def test_a_prediction_that_calls_every_decoy_loses_dice_to_decoys_only(decoys):
    root, truth, marked = decoys
    pred_dir = root / "calls_decoys"
    pred_dir.mkdir()
    shutil.copy(marked.mask_path, pred_dir / f"{truth.slide_id}_wsi_pred.tiff")  # glomeruli and decoys > 0
    ((sid, c),) = list(slide_counts(pred_dir, root / "truth"))
    assert sid == truth.slide_id
    assert c["tp"] == c["true"] > 0 and c["fn"] == c["missed_fn"] == 0
    assert c["fp"] == c["decoy_fp"] > 0 and c["rim_fp"] == 0  # decoys sit far from every glomerulus
    assert dice(c["tp"], c["fp"], c["fn"]) < 1.0
    assert dice(c["tp"], c["fp"] - c["decoy_fp"], c["fn"]) == 1.0
    assert "without decoy FP 1.000" in line(sid, c) and f"decoy FP {c['fp'] / c['true']:.3f}" in line(sid, c)


def test_the_truth_itself_has_nothing_to_budget(decoys):
    root, truth, _ = decoys
    pred_dir = root / "perfect"
    pred_dir.mkdir()
    shutil.copy(truth.mask_path, pred_dir / f"{truth.slide_id}_wsi_pred.tiff")
    ((_, c),) = list(slide_counts(pred_dir, root / "truth"))
    assert c["tp"] == c["true"] > 0
    assert c["fp"] == c["fn"] == c["decoy_fp"] == c["rim_fp"] == c["missed_fn"] == 0
