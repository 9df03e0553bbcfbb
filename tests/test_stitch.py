"""The merger and the per-slide vector/picture outputs, on synthetic label maps with known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from custom.metrics.dice import dice_score
from custom.wsi.cleanup import channel_argmax, clean_probabilities
from custom.wsi.geojson import iter_features, mask_to_features, rasterise_features, write_geojson
from custom.wsi.overlay import draw_outlines
from custom.wsi.stitch import LabelStore, RegionMerger


def _tiles(height, width, tile, overlap):
    stride = tile - overlap
    ys = range(0, max(1, height - overlap), stride)
    xs = range(0, max(1, width - overlap), stride)
    return [(y, x) for y in ys for x in xs]


def _merge(truth_probs, tiles, tile, blend, factor=1, skip=()):
    channels, height, width = truth_probs.shape
    store = LabelStore((height * factor, width * factor), factor=factor, probability_factor=4)
    merger = RegionMerger(
        (1, channels, height, width),
        tile_locations=[t for t in tiles if t not in skip],
        tile_size=(tile, tile),
        sink=store,
        blend=blend,
        chunk_px=32,
    )
    padded = np.zeros((channels, height + tile, width + tile), np.float32)
    padded[:, :height, :width] = truth_probs
    peak_open = 0
    for y, x in tiles:
        if (y, x) in skip:
            continue
        merger.aggregate(torch.from_numpy(padded[None, :, y : y + tile, x : x + tile]), (y, x))
        peak_open = max(peak_open, len(merger.accumulators))
    merger.finalize()
    store.close()
    return store, peak_open


@pytest.mark.parametrize("overlap", [0, 24])
@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_region_merger_reproduces_the_label_map_exactly(overlap, blend):
    rng = np.random.default_rng(0)
    height, width, tile = 150, 230, 64
    logits = rng.normal(size=(3, height, width)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    store, _ = _merge(probs, _tiles(height, width, tile, overlap), tile, blend)
    try:
        assert np.array_equal(store.labels[:], probs.argmax(0))
    finally:
        store.remove()
    assert not store.dir.exists()


def test_region_merger_leaves_untiled_regions_zero_and_holds_only_a_band_of_chunks():
    height, width, tile = 256, 512, 64
    probs = np.zeros((2, height, width), np.float32)
    probs[1] = 1.0  # foreground everywhere, so any written pixel would be 1
    tiles = _tiles(height, width, tile, 16)
    skipped = {t for t in tiles if t[1] >= 256}  # the right half has "no tissue"
    store, peak_open = _merge(probs, tiles, tile, "constant", skip=skipped)
    try:
        labels = store.labels[:]
        assert labels[:, :240].min() == 1
        assert labels[:, 256 + 64 :].max() == 0  # background is 0, not NaN or garbage
        # chunks of 32 px: one open band is at most (tile+overlap)/32 + 1 rows of 512/32 chunks
        assert peak_open <= 4 * (width // 32)
    finally:
        store.remove()


def test_label_store_upsamples_to_level0_and_pools_probability():
    height, width, tile = 64, 96, 32
    probs = np.zeros((2, height, width), np.float32)
    probs[0] = 1.0
    probs[:, 10:30, 40:80] = [[[0.0]], [[1.0]]]
    store, _ = _merge(probs, _tiles(height, width, tile, 0), tile, "constant", factor=2)
    try:
        level0 = store.labels[:]
        assert level0.shape == (128, 192)
        assert np.array_equal(level0, np.repeat(np.repeat(probs.argmax(0), 2, 0), 2, 1))
        prob = store.probability[:]  # 4x coarser than the inference level
        assert prob.shape == (16, 24)
        assert prob[4, 12] == 255 and prob[0, 0] == 0
    finally:
        store.remove()


def test_geojson_polygons_rasterise_back_to_the_mask():
    yy, xx = np.mgrid[:300, :400]
    labels = (((yy - 100) ** 2 + (xx - 120) ** 2) < 60**2).astype(np.uint8)
    labels[(yy - 200) ** 2 / 40**2 + (xx - 300) ** 2 / 70**2 < 1] = 1
    labels[95:105, 115:125] = 0  # a hole
    features = mask_to_features(labels, scale=4.0, mpp=(0.25, 0.25), class_names={1: "Glomerulus"})
    assert len(features) == 2
    assert all(f["properties"]["classification"]["name"] == "Glomerulus" for f in features)
    first = features[0]["properties"]
    # area: pixel count x (4 level-0 px per label px)^2 x 0.25^2 um^2
    sizes = sorted(np.bincount(ndi.label(labels)[0].ravel())[1:])
    assert sorted(f["properties"]["area_px"] / 16 for f in features) == pytest.approx(sizes)
    assert first["area_um2"] == pytest.approx(first["area_px"] * 0.0625)
    back = rasterise_features(features, labels.shape, scale=4.0)
    assert dice_score(back, labels) > 0.98


def test_geojson_is_streamed_to_a_valid_file_and_a_failed_write_leaves_nothing(tmp_path):
    labels = np.zeros((64, 64), np.uint8)
    labels[5:15, 5:15], labels[30:50, 20:40] = 1, 1
    path = tmp_path / "slide.geojson"
    count = write_geojson(path, iter_features(labels, scale=2.0, class_names={1: "Glomerulus"}))
    collection = json.loads(path.read_text())
    assert count == 2 and collection["type"] == "FeatureCollection"
    assert collection["features"] == mask_to_features(labels, scale=2.0, class_names={1: "Glomerulus"})

    def broken():
        yield from iter_features(labels)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_geojson(tmp_path / "other.geojson", broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.geojson"]  # no partial file


def test_overlay_draws_outline_pixels_only_on_object_borders():
    thumb = np.full((100, 100, 3), 240, np.uint8)
    labels = np.zeros((50, 50), np.uint8)  # half size: resized to the thumbnail
    labels[10:30, 10:30] = 1
    out = draw_outlines(thumb, labels)
    changed = np.any(out != thumb, axis=-1)
    assert changed[20, 20:60].any() and not changed[40:58, 40:58].any() and not changed[80:, 80:].any()


@pytest.mark.parametrize("classes", [2, 3])
def test_channel_argmax_matches_numpy_including_ties(classes):
    rng = np.random.default_rng(classes)
    probs = rng.random((classes, 64, 48)).astype(np.float32)
    probs[:, :8, :8] = 0.5  # exact ties: the first class wins, as with argmax
    probs[1:, 8:16, :8] = 0.9  # ties between foreground classes
    assert np.array_equal(channel_argmax(probs), probs.argmax(axis=0))


def test_tile_cleanup_foreground_test_agrees_with_argmax_on_ties():
    probs = torch.full((1, 2, 64, 64), 0.5)  # an all-tie tile is background, as argmax says
    probs[0, 1, 20:40, 20:40], probs[0, 0, 20:40, 20:40] = 0.9, 0.1  # one 400 px object
    out = clean_probabilities(probs, min_object_px=500, max_hole_px=0)
    assert (out.argmax(dim=1) == 0).all()  # the object was a speck, and the ties stayed background
    kept = clean_probabilities(probs, min_object_px=300, max_hole_px=0)
    assert int((kept.argmax(dim=1) == 1).sum()) == 400
