"""Multi-class end to end on the NEPTUNE-style stand-in: six-class ROIs load, train, segment, score per class."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from custom.bundle import workflow
from custom.checkpoints import read_checkpoint
from custom.data.datalists import load_datalist
from custom.metrics.evaluate import evaluate_folders
from custom.synth.neptune import CLASS_NAMES, NUM_CLASSES, ROI_PX, write_neptune_rois
from custom.wsi.reader import open_mask, open_slide

NAMES = {str(k): v for k, v in CLASS_NAMES.items()}


@pytest.fixture(scope="module")
def neptune(tmp_path_factory):
    """Two 3000 x 3000 ROIs (0.25 um/px) for training and validation, and a small held-out ROI
    scanned at 0.5 um/px to segment: after a few steps the six-class prediction is speckled, and
    GeoJSON writing costs time per fragment, so it is kept to one 512-px tile."""
    root = tmp_path_factory.mktemp("neptune")
    datalist = write_neptune_rois(root / "rois", count=2, seed=3)
    write_neptune_rois(root / "held_out", count=1, seed=9, side=512, mpp=0.5)
    return root, datalist


def test_neptune_style_rois_have_six_classes_at_the_slide_scale(neptune):
    _, datalist = neptune
    content = json.loads(datalist.read_text())
    assert content["labels"] == NAMES and content["num_classes"] == NUM_CLASSES == 7
    items = load_datalist(datalist)
    assert len(items) == 2
    for item in items:
        slide, mask = open_slide(item["image"]), open_mask(item["label"])
        assert slide.level_shapes[0] == mask.level_shapes[0] == (ROI_PX, ROI_PX) and slide.mpp == (0.25, 0.25)
        counts = np.bincount(mask.read_level(1).ravel(), minlength=NUM_CLASSES)
        assert (counts[1:] > 0).all() and counts.sum() == (ROI_PX // 2) ** 2  # every class, nothing else


def test_neptune_style_data_trains_segments_and_scores_per_class(neptune, tmp_path):
    root, datalist = neptune
    flow = workflow(
        ["train", "tiny"], "train", datalist=str(datalist), output_dir=str(tmp_path / "run"),
        num_classes=NUM_CLASSES, class_names=NAMES, patch_size=[256, 256], samples_per_epoch=8,
        batch_size=2, val_patches=2, max_epochs=1,
    )  # fmt: skip
    flow.run()
    # the sampler keeps the label classes instead of binarising them
    sample = flow.parser.get_parsed_content("train#dataset").reader.read(
        flow.parser.get_parsed_content("train#dataset").fixed_items(1)[0]
    )
    assert len(np.unique(sample["label"].numpy())) > 2 and int(sample["label"].max()) < NUM_CLASSES
    ckpt = read_checkpoint(tmp_path / "run" / "model.pt")
    assert (
        ckpt["network_config"]["num_classes"] == NUM_CLASSES and ckpt["input_config"]["class_names"] == NAMES
    )

    held_out = root / "held_out"
    infer = workflow(
        ["inference", "tiny"], "infer", input=str(held_out / "roi_9_wsi.tiff"), output_dir=str(tmp_path / "pred"),
        ckpt_path=str(tmp_path / "run" / "model.pt"), overwrite=True, class_names=NAMES,
    )  # fmt: skip
    (outcome,) = infer.parser.get_parsed_content("segment")
    assert outcome.status == "done", outcome.reason
    predicted = np.unique(open_mask(tmp_path / "pred" / "roi_9_wsi_pred.tiff").read_level(0))
    assert len(set(predicted.tolist()) - {0}) >= 2 and predicted.max() < NUM_CLASSES  # a multi-class mask
    features = json.loads((tmp_path / "pred" / "roi_9_wsi.geojson").read_text())["features"]
    names = Counter(f["properties"]["classification"]["name"] for f in features)
    assert names and set(names) <= set(CLASS_NAMES.values())

    report = evaluate_folders(
        tmp_path / "pred", held_out, tmp_path / "report", patch_sizes=256, num_classes=NUM_CLASSES,
        class_names=str(held_out / "neptune.json"), progress=False,
    )  # fmt: skip
    (slide,) = report["slides"]
    per_class = [slide[f"dice_label_{c}"] for c in CLASS_NAMES]
    assert all(0.0 <= d <= 1.0 for d in per_class)
    assert slide["wsi_dice"] == pytest.approx(np.mean(per_class))
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "## Per label (whole slide)" in summary and "Dice label 1 (tuft)" in summary
    assert "Dice label 6 (interstitium)" in summary
