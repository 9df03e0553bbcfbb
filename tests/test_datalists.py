"""Datalists: JSON lists, the KPIs folder layouts, and slide-level splits."""

from __future__ import annotations

import json

import pytest

from custom.data.datalists import (
    discover_kpis_patches,
    discover_kpis_slides,
    load_datalist,
    load_items,
    slide_id,
    split_by_slide,
)
from custom.errors import ConfigError


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_kpis_wsi_layout_pairs_slides_with_masks_and_reads_the_class(tmp_path):
    root = tmp_path / "Task2_WSI_level"
    for cls, ids in {"56Nx": ["12_116", "12_117"], "NEP25": ["08_368_01"], "normal": ["normal_M1"]}.items():
        for i in ids:
            _touch(root / cls / f"{i}_wsi.tiff")
            _touch(root / cls / f"{i}_mask.tiff")
    items = discover_kpis_slides(root)
    assert len(items) == 4
    by_id = {slide_id(it["image"]): it for it in items}
    assert by_id["12_116"]["label"].endswith("56Nx/12_116_mask.tiff")
    assert by_id["08_368_01"]["class"] == "NEP25" and by_id["normal_M1"]["class"] == "normal"


def test_kpis_wsi_layout_without_a_mask_is_a_clear_error_unless_labels_are_optional(tmp_path):
    _touch(tmp_path / "DN" / "11-356_wsi.tiff")
    with pytest.raises(ConfigError, match=r"1 slide\(s\) have no mask .*11-356_wsi.tiff"):
        discover_kpis_slides(tmp_path)
    assert discover_kpis_slides(tmp_path, require_labels=False)[0]["class"] == "DN"


def test_kpis_patch_layout_pairs_img_and_mask_jpgs_per_case(tmp_path):
    for case in ("case1", "case2"):
        for n in (1, 2):
            _touch(tmp_path / "DN" / case / "img" / f"{case}_{n}_img.jpg")
            _touch(tmp_path / "DN" / case / "mask" / f"{case}_{n}_mask.jpg")
    items = discover_kpis_patches(tmp_path)
    assert len(items) == 4 and all(it["label"].endswith("_mask.jpg") for it in items)
    assert {it["case"] for it in items} == {"case1", "case2"} and {it["class"] for it in items} == {"DN"}
    split = split_by_slide(items, val_fraction=0.5, seed=0)
    # patches of one case never straddle the split
    train_cases = {it["case"] for it in split["training"]}
    val_cases = {it["case"] for it in split["validation"]}
    assert train_cases and val_cases and not train_cases & val_cases


def test_json_datalist_resolves_paths_relative_to_itself(tmp_path):
    _touch(tmp_path / "data" / "a_wsi.tiff")
    _touch(tmp_path / "data" / "a_mask.tiff")
    listing = tmp_path / "data" / "list.json"
    listing.write_text(
        json.dumps({"training": [{"image": "a_wsi.tiff", "label": "a_mask.tiff", "class": "DN"}]})
    )
    (item,) = load_items(datalist=str(listing))
    assert item["image"] == str((tmp_path / "data" / "a_wsi.tiff").resolve()) and item["class"] == "DN"
    listing.write_text(json.dumps([{"image": "missing_wsi.tiff", "label": "a_mask.tiff"}]))
    with pytest.raises(ConfigError, match=r"do not exist, first: .*missing_wsi\.tiff"):
        load_datalist(listing)
    with pytest.raises(ConfigError, match="pass dataset_dir"):
        load_items()


def test_split_is_by_slide_stratified_by_class_and_reproducible():
    items = [{"image": f"/s/{c}_{i}_wsi.tiff", "class": c} for c in ("56Nx", "DN") for i in range(5)]
    split = split_by_slide(items, val_fraction=0.2, seed=3)
    assert len(split["validation"]) == 2 and len(split["training"]) == 8
    assert {it["class"] for it in split["validation"]} == {"56Nx", "DN"}
    assert split == split_by_slide(items, val_fraction=0.2, seed=3)
    assert split_by_slide(items[:2], val_fraction=0.2)["validation"]  # two slides: one is held out


def test_both_published_spellings_of_56nx_are_one_class(tmp_path):
    # the organisers' README layouts say 56NX/img/ and 56NX/mask/; the data's folders say 56Nx
    _touch(tmp_path / "56NX" / "img" / "12_116_wsi.tiff")
    _touch(tmp_path / "56NX" / "mask" / "12_116_mask.tiff")
    _touch(tmp_path / "56Nx" / "12_117_wsi.tiff")
    _touch(tmp_path / "56Nx" / "12_117_mask.tiff")
    items = discover_kpis_slides(tmp_path)
    assert [it["class"] for it in items] == ["56Nx", "56Nx"]
    assert items[0]["label"].endswith("56NX/mask/12_116_mask.tiff")


def test_a_task1_patch_folder_is_a_training_dataset_dir(tmp_path):
    for n in (1, 2):
        _touch(tmp_path / "NEP25" / "case7" / "img" / f"case7_{n}_img.jpg")
        _touch(tmp_path / "NEP25" / "case7" / "mask" / f"case7_{n}_mask.jpg")
    items = load_items(dataset_dir=str(tmp_path))
    assert len(items) == 2 and {it["case"] for it in items} == {"case7"}
    assert all(it["image"].endswith("_img.jpg") and it["class"] == "NEP25" for it in items)
