"""The random 4K tissue sampler and the tile sampler, checked against the synthetic ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose, MapTransform, RandomizableTransform
from monai.utils import set_determinism
from PIL import Image

from custom.data import patches
from custom.data.datalists import discover_kpis_slides
from custom.data.patches import FixedTissuePatchDataset, RandomTissuePatchDataset, TilePatchDataset
from custom.data.tiles import RandomTileCropDataset
from custom.data.tissue import TissueCache
from custom.wsi.reader import open_mask, open_slide


@pytest.fixture(scope="module")
def items(kpis_folder):
    return discover_kpis_slides(kpis_folder)


def _take(dataset, n):
    it = iter(dataset)
    return [next(it) for _ in range(n)]


def test_random_patches_are_centred_on_tissue_and_labels_match_the_mask(items):
    tissue = TissueCache()
    ds = RandomTissuePatchDataset(
        items, patch_size=256, patch_level=1, samples_per_epoch=24, seed=5, tissue=tissue
    )
    rng = np.random.default_rng(0)
    for _ in range(24):
        item = ds.draw(rng)
        slide = open_slide(item["image"])
        ds0 = slide.downsamples[1]
        centre = (item["location"][0] + 128 * ds0, item["location"][1] + 128 * ds0)
        t = tissue.get(slide)
        cy, cx = int(centre[0] / t.scale[0]), int(centre[1] / t.scale[1])
        assert t.mask[min(cy, t.mask.shape[0] - 1), min(cx, t.mask.shape[1] - 1)]
    for sample in _take(ds, 6):
        meta = sample["image"].meta
        (y, x), path = meta["location"], meta["path"]
        label_path = next(it["label"] for it in items if it["image"] == path)
        truth = open_mask(label_path).read_region((int(y), int(x)), (256, 256), level=1) > 0
        assert sample["image"].shape == (3, 256, 256) and sample["label"].shape == (1, 256, 256)
        assert np.array_equal(sample["label"][0].numpy().astype(bool), truth)


def test_foreground_oversampling_centres_patches_on_glomeruli(items):
    ds = RandomTissuePatchDataset(
        items, patch_size=128, patch_level=1, samples_per_epoch=16, foreground_ratio=1.0
    )
    labels = [s["label"] for s in _take(ds, 16)]
    # every patch is centred on a labelled thumbnail cell, so its centre region is mostly glomerulus
    assert all(lab.sum() > 0 for lab in labels)
    plain = RandomTissuePatchDataset(items, patch_size=128, patch_level=1, samples_per_epoch=16, seed=1)
    fraction = lambda batch: float(torch.stack(batch).float().mean())  # noqa: E731
    assert fraction(labels) > 3 * fraction([s["label"] for s in _take(plain, 16)])


def test_patch_centres_follow_the_sidecar_objects(items):
    """A patch centred on a true glomerulus centre (from the sidecar) is labelled there."""
    item = items[0]
    sidecar = item["image"].replace("_wsi.tiff", "_objects.json")
    glom = next(o for o in json.loads(Path(sidecar).read_text())["objects"] if o["label"] == "glomerulus")
    cy, cx = glom["cy"], glom["cx"]
    ds = patches.LabelledPatchWSIDataset(
        [{**item, "location": [int(cy) - 64, int(cx) - 64], "size": [128, 128], "level": 0}]
    )
    sample = ds[0]
    assert sample["label"][0, 64, 64] == 1


def test_same_seed_gives_identical_first_batches_across_runs_and_workers(items):
    def first_batch(seed, workers):
        ds = RandomTissuePatchDataset(items, patch_size=64, patch_level=2, samples_per_epoch=8, seed=seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers)
        torch.manual_seed(123)  # what set_determinism does in train.json
        return next(iter(loader))["image"]

    assert torch.equal(first_batch(0, 0), first_batch(0, 0))
    assert torch.equal(first_batch(0, 2), first_batch(0, 2))
    assert not torch.equal(first_batch(0, 0), first_batch(1, 0))


def test_streams_differ_per_worker_per_rank_and_per_epoch(items, monkeypatch):
    ds = RandomTissuePatchDataset(items, patch_size=64, patch_level=2, samples_per_epoch=4, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    torch.manual_seed(0)
    epoch1 = [np.asarray(b["image"].meta["location"]) for b in loader]
    epoch2 = [np.asarray(b["image"].meta["location"]) for b in loader]
    assert not np.array_equal(epoch1[0], epoch1[1])  # two workers, two streams
    assert not np.array_equal(np.concatenate(epoch1), np.concatenate(epoch2))  # a new epoch, new patches
    main = [s["image"].meta["location"] for s in _take(ds, 4)]
    again = [s["image"].meta["location"] for s in _take(ds, 4)]
    assert any(not np.array_equal(a, b) for a, b in zip(main, again, strict=True))
    monkeypatch.setattr(patches, "rank_world", lambda: (1, 2))  # rank 1 of 2
    other_rank = RandomTissuePatchDataset(items, patch_size=64, patch_level=2, samples_per_epoch=4, seed=0)
    assert len(other_rank) == 2
    assert not np.array_equal(_take(other_rank, 1)[0]["image"].meta["location"], main[0])


def test_any_patch_size_including_3840_by_2160(items):
    ds = RandomTissuePatchDataset(items[:1], patch_size=(2160, 3840), patch_level=0, samples_per_epoch=1)
    (sample,) = _take(ds, 1)
    assert sample["image"].shape == (3, 2160, 3840) and sample["label"].shape == (1, 2160, 3840)


def test_tile_sampler_cuts_a_fixed_grid_over_tissue_and_validation_set_is_fixed(items):
    tiles = TilePatchDataset(items, patch_size=512, patch_level=1, min_tissue_fraction=0.5)
    tiles_per_slide = [(it["image"], *it["location"]) for it in tiles.data]
    assert len(tiles_per_slide) == len(set(tiles_per_slide)) > 0
    assert {it["image"] for it in tiles.data} == {it["image"] for it in items}
    assert all(
        y % 1024 == 0 and x % 1024 == 0 for _, y, x in tiles_per_slide
    )  # 512 px at level 1 = 1024 at level 0
    assert TilePatchDataset(items, patch_size=512, patch_level=1, min_tissue_fraction=0.5).data == tiles.data
    val = FixedTissuePatchDataset(items, patch_size=256, patch_level=1, count=5, seed=3)
    again = FixedTissuePatchDataset(items, patch_size=256, patch_level=1, count=5, seed=3)
    assert [d["location"] for d in val.data] == [d["location"] for d in again.data]
    assert torch.equal(val[0]["label"], again[0]["label"])


class _RecordDraw(RandomizableTransform, MapTransform):
    """Writes the random number it drew for each patch into the patch."""

    def __init__(self, keys):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)

    def __call__(self, data):
        d = dict(data)
        d["draw"] = float(self.R.rand())
        return d


def test_every_patch_draws_its_own_augmentation_from_a_seeded_compose(items, tmp_path):
    """MONAI's bool(Compose) re-seeds its transforms; the readers must not truth-test their transform,
    or every patch gets the same flips, intensity shifts and stains."""

    def draws(dataset):
        return [sample["draw"] for sample in _take(dataset, 8)]

    set_determinism(seed=0)  # as train.json does, so that get_seed() is fixed
    try:
        slides = RandomTissuePatchDataset(
            items,
            patch_size=64,
            patch_level=2,
            samples_per_epoch=8,
            transform=Compose([_RecordDraw("image")]),
        )
        tile = {"image": str(tmp_path / "tile.png"), "label": str(tmp_path / "tile_label.png")}
        Image.fromarray(np.full((128, 128, 3), 200, np.uint8)).save(tile["image"])
        Image.fromarray(np.eye(128, dtype=np.uint8)).save(tile["label"])
        tiles = RandomTileCropDataset(
            [tile], patch_size=64, samples_per_epoch=8, transform=Compose([_RecordDraw("image")])
        )
        for dataset in (slides, tiles):
            assert len(set(draws(dataset))) == 8
    finally:
        set_determinism(seed=None)
