"""Training on image tiles ({image, label} PNGs, as MONAI Label hands them), and fine-tuning a shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import run as bundle_run
from PIL import Image

from custom.bundle import bundle_root
from custom.checkpoints import read_checkpoint, save_checkpoint
from custom.data.patches import FixedTissuePatchDataset, RandomTissuePatchDataset
from custom.data.tiles import (
    FixedTileCropDataset,
    RandomTileCropDataset,
    fixed_patches,
    random_patches,
)
from custom.errors import ConfigError
from custom.networks import holohisto_tiny, network_config
from custom.wsi.reader import open_mask, open_slide

PATCH = 64


def _tile(folder, name: str, height: int, width: int, blob: tuple[int, int, int, int]) -> dict:
    """A PNG tile whose pixels encode their own position, and a label with one labelled box."""
    ys, xs = np.mgrid[:height, :width]
    image = np.stack([ys % 251, xs % 251, (ys + xs) % 7], axis=-1).astype(np.uint8)
    label = np.zeros((height, width), np.uint8)
    y0, x0, y1, x1 = blob
    label[y0:y1, x0:x1] = 1
    Image.fromarray(image).save(folder / f"{name}.png")
    Image.fromarray(label).save(folder / f"{name}_label.png")
    return {"image": str(folder / f"{name}.png"), "label": str(folder / f"{name}_label.png")}


def test_random_crops_are_patch_sized_pieces_of_the_tile_at_the_drawn_place(tmp_path):
    item = _tile(tmp_path, "a", 200, 300, (10, 20, 40, 60))
    ds = RandomTileCropDataset([item], patch_size=PATCH, samples_per_epoch=8, seed=1)
    image = np.asarray(Image.open(item["image"]))
    rng = np.random.default_rng(0)
    for _ in range(8):
        place = ds.draw(rng)
        top, left = place["location"]
        assert 0 <= top <= 200 - PATCH and 0 <= left <= 300 - PATCH  # inside: the tile is large enough
        crop = ds.read(place)
        assert crop["image"].shape == (3, PATCH, PATCH) and crop["label"].shape == (1, PATCH, PATCH)
        np.testing.assert_array_equal(
            crop["image"].numpy().transpose(1, 2, 0), image[top : top + PATCH, left : left + PATCH]
        )
    assert len(list(ds)) == 8


def test_a_tile_smaller_than_the_patch_is_padded_with_white_glass_and_background(tmp_path):
    item = _tile(tmp_path, "small", 40, 50, (0, 0, 40, 50))
    crop = RandomTileCropDataset([item], patch_size=PATCH, samples_per_epoch=1).read(
        {**item, "location": [-10, -5], "size": [PATCH, PATCH]}
    )
    image, label = crop["image"].numpy(), crop["label"].numpy()[0]
    assert label.sum() == 40 * 50  # the whole tile is inside the crop
    assert (image[:, :10] == 255).all() and (image[:, :, :5] == 255).all()
    assert (label[:10] == 0).all() and (label[50:] == 0).all()


def test_foreground_ratio_one_centres_every_crop_on_a_labelled_pixel(tmp_path):
    item = _tile(tmp_path, "sparse", 256, 256, (200, 200, 204, 204))
    ds = RandomTileCropDataset([item], patch_size=PATCH, samples_per_epoch=16, foreground_ratio=1.0, seed=3)
    assert all(crop["label"].sum() > 0 for crop in ds)
    uniform = RandomTileCropDataset([item], patch_size=PATCH, samples_per_epoch=16, seed=3)
    assert sum(crop["label"].sum() > 0 for crop in uniform) < 16


def test_validation_crops_are_the_same_every_epoch(tmp_path):
    items = [_tile(tmp_path, "a", 128, 160, (0, 0, 30, 30)), _tile(tmp_path, "b", 96, 200, (50, 50, 90, 90))]
    val = FixedTileCropDataset(items, patch_size=PATCH, count=5, seed=2)
    again = FixedTileCropDataset(items, patch_size=PATCH, count=5, seed=2)
    assert len(val) == 5
    for i in range(5):
        assert torch.equal(val[i]["image"], again[i]["image"]) and torch.equal(
            val[i]["label"], again[i]["label"]
        )


def test_the_datalist_picks_the_sampler_and_a_mix_of_tiles_and_slides_is_refused(tmp_path, kpis_folder):
    tiles = [_tile(tmp_path, "a", 128, 128, (0, 0, 8, 8))]
    slide = sorted(kpis_folder.rglob("*_wsi.tiff"))[0]
    slides = [{"image": str(slide), "label": str(slide).replace("_wsi", "_mask")}]
    assert isinstance(random_patches(tiles, patch_size=PATCH), RandomTileCropDataset)
    assert isinstance(fixed_patches(tiles, patch_size=PATCH, count=1), FixedTileCropDataset)
    assert isinstance(random_patches(slides, patch_size=PATCH, patch_level=2), RandomTissuePatchDataset)
    assert isinstance(
        fixed_patches(slides, patch_size=PATCH, patch_level=2, count=1), FixedTissuePatchDataset
    )
    with pytest.raises(ConfigError, match=f"^{slide}: the datalist mixes slides with image tiles"):
        random_patches(slides + tiles, patch_size=PATCH)
    # an image whose pixel size is declared is a patch read by scale, like a slide, not a tile taken as is
    scaled = [dict(tiles[0], mpp=0.25)]
    assert isinstance(random_patches(scaled, patch_size=PATCH, patch_mpp=0.5), RandomTissuePatchDataset)
    with pytest.raises(ConfigError, match="no validation tiles"):
        FixedTileCropDataset([], patch_size=PATCH)


def test_a_bad_tile_fails_with_one_line_that_names_the_file(tmp_path):
    item = _tile(tmp_path, "a", 64, 80, (0, 0, 8, 8))
    rgb_label = tmp_path / "rgb.png"
    Image.new("RGB", (80, 64)).save(rgb_label)
    short_label = tmp_path / "short.png"
    Image.new("L", (80, 63)).save(short_label)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    cases = {
        str(rgb_label): "a label tile must have one channel",
        str(short_label): "label is 80 x 63 px but its image",
        str(not_image): "not a readable image",
        str(tmp_path / "gone.png"): "no such tile",
    }
    for label, reason in cases.items():
        ds = RandomTileCropDataset([{**item, "label": label}], patch_size=PATCH, foreground_ratio=1.0)
        with pytest.raises(ConfigError) as err:
            next(iter(ds))
        assert str(err.value).startswith(f"{label}: {reason}") and "\n" not in str(err.value)


def test_train_json_fine_tunes_the_shipped_model_on_tile_items_as_monai_label_runs_it(kpis_folder, tmp_path):
    """The overrides MONAI Label's BundleTrainTask passes to monai.bundle.run, on tile items.

    With a learning rate of 0 the saved weights are the ones `finetune_from` loaded: so training built the
    shipped network (tiny, not train.json's full default) and started from its weights.
    """
    torch.manual_seed(7)  # weights that were loaded cannot pass for a fresh init
    net = holohisto_tiny()
    record = {"patch_size": [PATCH, PATCH], "patch_level": 1, "patch_mpp": None}
    shipped = save_checkpoint(tmp_path / "shipped.pt", net, network_config(net), input_config=record)
    slide = open_slide(sorted(kpis_folder.rglob("*_wsi.tiff"))[0])
    mask = open_mask(sorted(kpis_folder.rglob("*_mask.tiff"))[0])
    items = []
    for i, corner in enumerate([(1024, 1024), (2048, 2048), (1024, 2048)]):
        Image.fromarray(slide.read_region(corner, (128, 128), level=1)).save(tmp_path / f"t{i}.png")
        Image.fromarray(mask.read_region(corner, (128, 128), level=1)).save(tmp_path / f"t{i}_label.png")
        items.append({"image": str(tmp_path / f"t{i}.png"), "label": str(tmp_path / f"t{i}_label.png")})
    out = tmp_path / "run"
    root = bundle_root()
    bundle_run(
        run_id="run",
        init_id=None,  # as MONAI Label runs it: no "initialize"
        final_id=None,
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "train.json"),
        bundle_root=str(root),
        finetune_from=str(shipped),
        device=torch.device("cpu"),
        **{
            "train#trainer#max_epochs": 1,
            "train#dataset#data": items[:2],
            "validate#dataset#data": items[2:],
        },
        samples_per_epoch=2,
        batch_size=2,
        val_patches=1,
        num_workers=0,
        learning_rate=0.0,
        output_dir=str(out),
    )
    saved = read_checkpoint(out / "model.pt")
    assert saved["network_config"] == network_config(net)
    assert saved["input_config"] == record | {
        "class_names": {"1": "Glomerulus"},
        "background_classes": [],
    }  # the scale trained at, and the classes
    # the codebook (k-means initialised on the first batch) and normalisation statistics move without a
    # learning rate; every weight must still be the shipped one
    weights = [
        k
        for k in saved["network"]
        if "quantize" not in k and not k.endswith(("running_mean", "running_var", "tracked"))
    ]
    assert len(weights) > 100
    assert all(torch.equal(saved["network"][k], net.state_dict()[k]) for k in weights)
    # MONAI Label offers every models/*.pt to /infer and loads its "model" weights: final.pt has them too
    final = read_checkpoint(out / "final.pt")
    assert all(torch.equal(c["model"][k], c["network"][k]) for c in (saved, final) for k in weights)
