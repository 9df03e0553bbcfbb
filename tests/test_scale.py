"""Training by physical scale: 20X and 40X slides in one datalist, read at one um/px."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from custom.bundle import workflow
from custom.checkpoints import read_checkpoint
from custom.data.patches import RandomTissuePatchDataset
from custom.errors import ConfigError
from custom.outputs.pyramid import pyramid_shapes, write_pyramid
from custom.synth import build_scene, render_mask, render_rgb, write_synthetic_slides
from custom.wsi.reader import open_slide

PATCH = 256
TARGET_MPP = 0.5


@pytest.fixture(scope="module")
def mixed_datalist(kpis_folder, tmp_path_factory):
    """Two 40X slides (0.25 um/px, 4096 x 3072) and two native-20X ones (0.5 um/px, 2048 x 1536)."""
    root = tmp_path_factory.mktemp("mixed")
    items = [
        {"image": str(next(kpis_folder.rglob(f"{sid}_wsi.tiff"))), "class": "56Nx"}
        for sid in ("synth_21", "synth_23")
    ]
    for result in write_synthetic_slides(
        root / "NEP25", count=2, width=2048, height=1536, seed=31, mpp=TARGET_MPP, progress=False
    ):
        items.append({"image": str(result.wsi_path), "class": "NEP25"})
    for item in items:
        item["label"] = item["image"].replace("_wsi.tiff", "_mask.tiff")
    path = root / "mixed.json"
    path.write_text(json.dumps({"training": items[::2] + items[1:2], "validation": items[3:]}))
    return path, items


def _scales(dataset, n=12):
    """(level-0 mpp of the slide, mpp of the level each drawn patch is read at) for n draws."""
    rng = np.random.default_rng(0)
    out = set()
    for _ in range(n):
        sample = dataset.draw(rng)
        slide = open_slide(sample["image"])
        out.add((round(slide.mpp[1], 3), round(slide.level_mpp(sample["level"])[1], 3)))
    return out


def test_training_reads_20x_and_40x_slides_at_one_physical_scale(mixed_datalist, tmp_path):
    datalist, items = mixed_datalist
    flow = workflow(
        ["train", "tiny"], "train", datalist=str(datalist), output_dir=str(tmp_path),
        patch_size=[PATCH, PATCH], samples_per_epoch=4, batch_size=2, val_patches=2, max_epochs=1,
    )  # fmt: skip
    flow.run()
    dataset = flow.parser.get_parsed_content("train#dataset")
    # every patch spans 256 px at 0.5 um/px = 128 um, whether the slide was scanned at 40X or 20X
    assert _scales(dataset) == {(0.25, TARGET_MPP), (TARGET_MPP, TARGET_MPP)}
    for sample in (dataset.reader.read(dataset.draw(np.random.default_rng(s))) for s in range(4)):
        assert tuple(sample["image"].shape) == (3, PATCH, PATCH)
    record = read_checkpoint(tmp_path / "model.pt")["input_config"]
    assert record == {
        "patch_size": [PATCH, PATCH], "patch_level": None, "patch_mpp": TARGET_MPP,
        "class_names": {"1": "Glomerulus"}, "background_classes": [],
    }  # fmt: skip
    # reading by level instead mixes the two scales: level 1 is 0.5 um/px on one, 1.0 on the other
    by_level = RandomTissuePatchDataset(items, patch_size=PATCH, patch_level=1, seed=0)
    assert {m for _, m in _scales(by_level)} == {TARGET_MPP, 1.0}


def _slide_without_mpp(folder, seed=41):
    """A synthetic RGB pyramid written without resolution tags, with its mask."""
    scene = build_scene(seed, 2048, 1536, mpp=0.25)
    shapes = pyramid_shapes(1536, 2048)
    folder.mkdir(parents=True, exist_ok=True)
    image, mask = folder / f"nompp_{seed}_wsi.tiff", folder / f"nompp_{seed}_mask.tiff"
    write_pyramid(image, shapes, lambda *r: render_rgb(scene, *r), channels=3, mpp=None, compression="jpeg")
    write_pyramid(mask, shapes, lambda *r: render_mask(scene, *r), channels=1, mpp=None, compression="lzw")
    assert open_slide(image).mpp is None
    return {"image": str(image), "label": str(mask)}


def test_a_kpis_slide_without_mpp_is_read_at_its_class_scale_with_a_warning(tmp_path, caplog):
    item = _slide_without_mpp(tmp_path / "DN")
    ds = RandomTissuePatchDataset([item], patch_size=64, patch_mpp=TARGET_MPP, seed=0)
    with caplog.at_level(logging.WARNING, logger="custom.data.scale"):
        sample = ds.draw(np.random.default_rng(0))
    assert sample["level"] == 1  # DN is scanned at 40X: 0.25 um/px, so 0.5 um/px is level 1
    assert "no pixel size in the file; assuming 0.25 um/px (KPIs 40X)" in caplog.text
    declared = RandomTissuePatchDataset([{**item, "mpp": 0.5}], patch_size=64, patch_mpp=TARGET_MPP, seed=0)
    assert declared.draw(np.random.default_rng(0))["level"] == 0  # the datalist's word wins


def test_a_slide_without_mpp_outside_kpis_is_a_clear_error(tmp_path):
    item = _slide_without_mpp(tmp_path / "other")
    ds = RandomTissuePatchDataset([item], patch_size=64, patch_mpp=TARGET_MPP, seed=0)
    with pytest.raises(ConfigError, match=r"nompp_41_wsi\.tiff: has no pixel size, .* add \"mpp\""):
        ds.draw(np.random.default_rng(0))
