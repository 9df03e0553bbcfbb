"""KPIs task-1 JPEG patches (and PNG label maps) as training data: read, rescaled, trained on."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from custom.bundle import workflow
from custom.checkpoints import read_checkpoint
from custom.data.datalists import discover_kpis_patches
from custom.data.patches import FixedTissuePatchDataset, RandomTissuePatchDataset
from custom.errors import ConfigError
from custom.synth import build_scene, render_mask, render_rgb

SIDE = 512  # level-0 side of each patch (the real ones are 2048)


@pytest.fixture(scope="module")
def task1_folder(tmp_path_factory):
    """Two cases of synthetic 40X patches around glomeruli, JPEG image and JPEG 0/255 mask."""
    root = tmp_path_factory.mktemp("task1_train")
    scene = build_scene(5, 8192, 6144, mpp=0.25)
    o = scene.objects
    for k in range(4):
        case = f"case{k // 2}"
        y, x = int(o.cy[k]) - SIDE // 2, int(o.cx[k]) - SIDE // 2
        for kind, array in (
            ("img", render_rgb(scene, 0, y, x, SIDE, SIDE)),
            ("mask", render_mask(scene, 0, y, x, SIDE, SIDE) * 255),
        ):
            path = root / "DN" / case / kind / f"{case}_{k}_{kind}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path, quality=90)
    return root


def test_a_patch_is_cut_from_the_image_resized_to_the_patch_scale(task1_folder):
    items = [{**it, "mpp": 0.25} for it in discover_kpis_patches(task1_folder)]
    ds = RandomTissuePatchDataset(items, patch_size=96, patch_mpp=0.5, foreground_ratio=1.0, seed=2)
    sample = ds.draw(np.random.default_rng(1))
    out = ds.reader.read(sample)
    (top, left), scale = out["image"].meta["location"], out["image"].meta["scale"]
    assert scale == 2.0 and out["image"].shape == (3, 96, 96) and out["label"].shape == (1, 96, 96)
    image = np.asarray(Image.open(sample["image"]).convert("RGB"))
    mask = np.asarray(Image.open(sample["label"]).convert("L"))
    small = cv2.resize(image, (SIDE // 2, SIDE // 2), interpolation=cv2.INTER_AREA)
    labels = cv2.resize(
        (mask >= (int(mask.min()) + int(mask.max()) + 1) // 2).astype(np.uint8),
        (SIDE // 2, SIDE // 2),
        interpolation=cv2.INTER_NEAREST,
    )
    assert np.array_equal(out["image"].numpy().transpose(1, 2, 0), small[top : top + 96, left : left + 96])
    assert np.array_equal(out["label"][0].numpy(), labels[top : top + 96, left : left + 96])
    assert out["label"].sum() > 0  # centred on a labelled pixel
    assert ds.reader.read(sample)["image"].meta["location"] == [top, left]  # a drawn sample stays put


def test_a_task1_folder_trains_through_train_json(task1_folder, tmp_path):
    flow = workflow(
        ["train", "tiny"], "train", dataset_dir=str(task1_folder), output_dir=str(tmp_path),
        patch_size=[128, 128], samples_per_epoch=4, batch_size=2, val_patches=2, max_epochs=1,
    )  # fmt: skip
    flow.run()
    assert flow.parser.get_parsed_content("train#trainer").state.iteration == 2
    validation = flow.parser.get_parsed_content("validate#dataset")
    assert {it["case"] for it in validation.data}.isdisjoint(
        {it["case"] for it in flow.parser.get_parsed_content("data")["training"]}
    )
    assert read_checkpoint(tmp_path / "model.pt")["input_config"]["patch_mpp"] == 0.5


def test_a_label_map_with_more_labels_than_classes_is_a_clear_error(tmp_path):
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "roi.png")
    labels = np.zeros((64, 64), np.uint8)
    labels[10:20, 10:20] = 7
    Image.fromarray(labels).save(tmp_path / "roi_label.png")
    item = {"image": str(tmp_path / "roi.png"), "label": str(tmp_path / "roi_label.png"), "mpp": 0.5}
    ds = FixedTissuePatchDataset([item], patch_size=32, patch_mpp=0.5, count=1, num_classes=7)
    with pytest.raises(
        ConfigError, match=r"roi_label\.png: holds label 7 but num_classes is 7 \(labels 0..6\)"
    ):
        ds[0]
    ok = FixedTissuePatchDataset([item], patch_size=32, patch_mpp=0.5, count=1, num_classes=8)
    assert set(np.unique(ok[0]["label"].numpy())) <= {0, 7}  # classes kept, not binarised
