"""Stitching pieces on label maps with known answers: the cell store, slide-wide components, the stitcher, GeoJSON."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import shapely.geometry
import torch
from scipy import ndimage as ndi

from custom.inference.chunks import ChunkedMask, max_pool2
from custom.inference.components import SlideComponents, apply_changes, label_cell, well_composed
from custom.inference.splitter import CellGrid
from custom.inference.stitcher import Stitcher, channel_argmax
from custom.outputs.geojson import (
    iter_features,
    mask_to_features,
    rasterise_features,
    trace_objects,
    write_geojson,
)
from custom.outputs.objects import write_object_outputs
from custom.outputs.overlay import draw_outlines, draw_rings
from custom.outputs.tables import slide_summary

EIGHT = np.ones((3, 3), bool)


def _blobs(shape, count, seed, radius=(3, 14)):
    """A binary map of random discs and rings (rings have holes), plus one-pixel specks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, bool)
    for _ in range(count):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        r = rng.uniform(*radius)
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        out |= d2 < r**2
        if rng.random() < 0.3:
            out[d2 < (r / 2.5) ** 2] = False  # a hole
    specks = rng.integers(0, [shape[0], shape[1]], size=(count, 2))
    out[specks[:, 0], specks[:, 1]] = True
    return out


def _components(mask, cell, order_seed, missing=(), min_object_px=0, max_hole_px=0):
    """Feed `mask` cut into `cell`-sized cells in a random order, as the stitcher's workers would."""
    grid = (-(-mask.shape[0] // cell), -(-mask.shape[1] // cell))
    present = [(i, j) for i in range(grid[0]) for j in range(grid[1]) if (i, j) not in missing]
    comps = SlideComponents(present, grid, min_object_px, max_hole_px)
    for k in np.random.default_rng(order_seed).permutation(len(present)):
        i, j = present[k]
        labels = mask[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell].astype(np.uint8)
        comps.add(i, j, (i * cell, j * cell), label_cell(labels)[0])
    return comps, present


@pytest.mark.parametrize(("seed", "cell"), [(0, 17), (1, 32), (2, 64)])
def test_slide_components_find_the_same_objects_as_labelling_the_whole_map(seed, cell):
    mask = _blobs((150, 230), 40, seed)
    comps, _ = _components(mask, cell, seed)
    drop, _ = comps.decide()
    found = comps.objects(drop)
    labels, n = ndi.label(mask, structure=EIGHT)
    assert len(found) == n
    for box, seed_px in found:
        k = labels[tuple(seed_px)]
        ys, xs = np.nonzero(labels == k)
        assert k > 0 and tuple(box) == (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)


def test_only_components_on_a_cell_edge_enter_the_union_find():
    """Specks and holes inside a cell are judged there: the union-find holds only the edge components."""
    mask = _blobs((150, 230), 60, 4, radius=(2, 5))
    cell = 32
    comps, present = _components(mask, cell, 0, min_object_px=5, max_hole_px=3)
    on_edge = inside = 0
    for i, j in present:
        tile = mask[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell]
        for labels, n in (ndi.label(tile, structure=EIGHT), ndi.label(~tile)):
            rim = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
            on_edge += np.unique(rim[rim > 0]).size
            inside += n - np.unique(rim[rim > 0]).size
    assert comps.tracked == on_edge and inside > on_edge
    # and the objects are still those of the whole map, small ones dropped by their whole size
    labels, n = ndi.label(mask, structure=EIGHT)
    sizes = np.bincount(labels.ravel())[1:]
    assert len(comps.objects(comps.decide()[0])) == int((sizes >= 5).sum())


def test_cleanup_judges_objects_and_holes_by_their_whole_size_across_cells():
    """Every cell holds under 100 px of each object, yet the objects spanning four cells stay."""
    mask = np.zeros((64, 64), bool)
    yy, xx = np.mgrid[:64, :64]
    mask[((yy - 32) ** 2 + (xx - 32) ** 2) < 12**2] = True  # ~450 px across the corner of 4 cells
    mask[30:34, 30:34] = False  # a 16-px hole, also across the corner
    mask[14:18, 31:34] = True  # a 12-px speck across a cell edge
    comps, present = _components(mask, 32, 0, min_object_px=100, max_hole_px=50)
    drop, fill = comps.decide()
    cleaned = np.zeros_like(mask, np.uint8)
    for i, j in present:
        tile = mask[i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32].astype(np.uint8)
        if comps.changed(i, j, drop, fill):
            local, lf, lb = label_cell(tile)
            tile = apply_changes(tile, lf, lb, *comps.changes(i, j, local, drop, fill), 50)
        cleaned[i * 32 : (i + 1) * 32, j * 32 : (j + 1) * 32] = tile
    expected = ndi.binary_fill_holes(mask)
    expected[14:18, 31:34] = False
    assert np.array_equal(cleaned.astype(bool), expected)
    assert len(comps.objects(drop)) == 1


def _cleaned(mask, cell, min_object_px, max_hole_px):
    comps, present = _components(mask, cell, 0, min_object_px=min_object_px, max_hole_px=max_hole_px)
    drop, fill = comps.decide()
    cleaned = np.zeros_like(mask, np.uint8)
    for i, j in present:
        tile = mask[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell].astype(np.uint8)
        if comps.changed(i, j, drop, fill):
            local, lf, lb = label_cell(tile)
            tile = apply_changes(tile, lf, lb, *comps.changes(i, j, local, drop, fill), max_hole_px)
        cleaned[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell] = tile
    return cleaned.astype(bool)


def test_a_dropped_object_takes_its_holes_with_it():
    """A speckled false positive goes whole (filling its pinholes used to leave them behind as specks)."""
    mask = np.zeros((64, 64), bool)
    mask[8:20, 8:20] = True
    mask[9:19:2, 9:19:2] = False  # 25 one-pixel holes in a 144-px square: an object of 119 px
    yy, xx = np.mgrid[:64, :64]
    d2 = (yy - 44) ** 2 + (xx - 44) ** 2
    ring = (d2 < 14**2) & (d2 >= 12**2)  # 164 px, across the corner of four cells
    disc = d2 < 8**2  # 197 px inside the ring, a 4-px gap between them
    mask |= ring | disc
    both_kept = _cleaned(mask, 32, min_object_px=130, max_hole_px=400)
    assert not both_kept[:24, :24].any()  # the lattice is gone, holes and all
    assert np.array_equal(both_kept[24:, 24:], d2[24:, 24:] < 14**2)  # the ring's gap is its hole: filled
    ring_dropped = _cleaned(mask, 32, min_object_px=180, max_hole_px=400)
    assert not ring_dropped[:24, :24].any()
    assert np.array_equal(ring_dropped, disc)  # the gap went with the ring; the disc inside it stays


def test_background_next_to_glass_is_never_a_hole_but_a_small_notch_on_the_slide_edge_is():
    mask = np.ones((64, 96), bool)
    mask[10:14, 40:44] = False  # a real hole
    mask[0:3, 60:63] = False  # a notch on the slide's edge, where the tile's margin saw glass padding
    mask[28:36, 62:64] = False  # a notch against the glass cell (1, 2)
    comps, _ = _components(mask, 32, 0, missing={(1, 2)}, max_hole_px=1000)
    _, fill = comps.decide()
    # the edge notch (the hole is inside cell (0, 1), judged there: it never enters the union-find)
    assert len({comps.roots()[k] for k in np.flatnonzero(fill)}) == 1
    assert comps.changed(0, 1, *comps.decide()) and not comps.changed(1, 0, *comps.decide())
    glass_only = np.ones((64, 96), bool)
    glass_only[28:36, 62:64] = False
    comps, _ = _components(glass_only, 32, 0, missing={(1, 2)}, max_hole_px=1000)
    assert not comps.decide()[1].any()
    cleaned = _cleaned(mask, 32, min_object_px=0, max_hole_px=1000)
    assert cleaned[0:3, 60:63].all() and cleaned[10:14, 40:44].all()


def test_chunked_mask_reads_any_region_and_halves_by_max():
    rng = np.random.default_rng(3)
    full = (rng.random((201, 333)) > 0.97).astype(np.uint8) * rng.integers(1, 4, (201, 333)).astype(np.uint8)
    full[:, 100:170] = 0  # whole empty chunks are not stored at all
    store = ChunkedMask(full.shape, 50)
    try:
        for i in range(store.grid[0]):
            for j in range(store.grid[1]):
                y0, y1, x0, x1 = store.box(i, j)
                store.put(i, j, full[y0:y1, x0:x1])
        assert (1, 2) not in store and np.array_equal(store.read(0, 201, 0, 333), full)
        assert np.array_equal(store.read(-5, 17, 320, 400), full[:17, 320:])
        assert store.any(0, 201, 0, 333) and not store.any(0, 201, 101, 149)
        half = store.halved()
        assert half.shape == (101, 167) and np.array_equal(half.read(0, 101, 0, 167), max_pool2(full))
        half.close()
        # max_pool2 itself against the plain 2 x 2 block max, odd edges padded with background
        padded = np.zeros((202, 334), np.uint8)
        padded[:201, :333] = full
        assert np.array_equal(max_pool2(full), padded.reshape(101, 2, 167, 2).max(axis=(1, 3)))
    finally:
        store.close()


def _stitch(truth, tile, overlap, blend, skip=(), smooth=False):
    grid = CellGrid.for_tiles(truth.shape[1:], (tile, tile), overlap)
    cells = [(i, j) for i in range(grid.rows) for j in range(grid.cols) if (i, j) not in skip]
    store = ChunkedMask(truth.shape[1:], grid.stride)
    comps = SlideComponents(cells, (grid.rows, grid.cols))
    stitcher = Stitcher(grid, cells, store, comps, blend=blend, smooth=smooth, workers=2)
    m = grid.margin[0]
    padded = np.zeros((truth.shape[0], truth.shape[1] + 2 * tile, truth.shape[2] + 2 * tile), np.float32)
    padded[:, m : m + truth.shape[1], m : m + truth.shape[2]] = truth
    for y, x in dict.fromkeys(grid.tile_origin(i, j) for i, j in cells):  # a shared tile comes once
        stitcher.submit(torch.from_numpy(padded[None, :, y + m : y + m + tile, x + m : x + m + tile]), (y, x))
    stats = stitcher.finish()
    return store, comps, stats, grid


@pytest.mark.parametrize(("overlap", "blend"), [(0, "crop"), (24, "crop"), (0, "constant"), (24, "gaussian")])
def test_stitcher_reproduces_the_label_map_exactly(overlap, blend):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 150, 230)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(0)
    store, _, stats, grid = _stitch(probs, 64, overlap, blend)
    try:
        assert stats["tiles"] == grid.rows * grid.cols
        assert np.array_equal(store.read(0, 150, 0, 230), probs.argmax(0))
    finally:
        store.close()


def test_tiles_are_shifted_inside_the_level_and_two_cells_may_share_one():
    grid = CellGrid.for_tiles((64, 300), (64, 64), 24)  # one tile high: both cell rows share it
    assert grid.tile_origin(0, 0) == grid.tile_origin(1, 0) == (0, 0)
    assert grid.cell_offset(0, 0) == (0, 0) and grid.cell_offset(1, 0) == (40, 0)
    assert grid.tile_origin(0, 3) == (0, 108) and grid.cell_offset(0, 3) == (0, 12)  # inside: centred
    assert grid.tile_origin(0, grid.cols - 1) == (0, 300 - 64)  # the last tile ends at the edge
    short = CellGrid.for_tiles((50, 300), (64, 64), 24)  # a level shorter than a tile pads as before
    assert short.tile_origin(0, 3) == (-12, 108)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 64, 300)).astype(np.float32)
    for blend in ("crop", "gaussian"):
        store, _, stats, grid = _stitch(logits, 64, 24, blend)
        try:
            assert stats["tiles"] == grid.rows * grid.cols == 16
            assert np.array_equal(store.read(0, 64, 0, 300), logits.argmax(0))
        finally:
            store.close()


def test_cells_never_inferred_stay_background():
    probs = np.zeros((2, 100, 100), np.float32)
    probs[1] = 1.0  # everything foreground
    store, _, _, grid = _stitch(probs, 40, 8, "gaussian", skip={(1, 1)})
    try:
        y0, y1, x0, x1 = grid.cell_box(1, 1)
        out = store.read(0, 100, 0, 100)
        assert not out[y0:y1, x0:x1].any() and out.sum() == 100 * 100 - (y1 - y0) * (x1 - x0)
    finally:
        store.close()


def test_crop_smooths_cell_borders_with_the_tiles_halo():
    """A one-pixel spur on a cell border is smoothed away: the crop keeps a pixel of the tile around the cell."""
    probs = np.zeros((2, 64, 64), np.float32)
    probs[0] = 1.0
    probs[0, 10:40, 10:32], probs[1, 10:40, 10:32] = 0.0, 1.0  # a square up to column 31 ...
    probs[0, 20, 32], probs[1, 20, 32] = 0.0, 1.0  # ... with a spur on column 32
    grid = CellGrid.for_tiles((64, 64), (40, 40), 8)
    assert grid.cell_box(0, 1)[2] == 32  # the spur is the first column of the next cell
    store, _, _, _ = _stitch(probs, 40, 8, "crop", smooth=True)
    try:
        out = store.read(0, 64, 0, 64)
        assert out[20, 32] == 0 and out[20, 31] == 1 and out[25, 25] == 1
    finally:
        store.close()


def test_geojson_has_one_valid_polygon_per_object_with_holes_as_interior_rings():
    mask = _blobs((160, 200), 30, 5, radius=(6, 16)).astype(np.uint8)
    mask[80, 80:84] = 1  # a one-pixel-wide line: centre tracing would give a degenerate ring
    mask[90, 90] = mask[91, 91] = 1  # two pixels joined at a corner only
    features = mask_to_features(mask, scale=2.0, mpp=(0.25, 0.25), class_names={1: "Glomerulus"})
    _, n = ndi.label(mask, structure=EIGHT)
    assert len(features) == n
    holes = 0
    for f in features:
        outer, *inner = f["geometry"]["coordinates"]
        polygon = shapely.geometry.Polygon(outer, inner)
        assert polygon.is_valid, shapely.validation.explain_validity(polygon)
        holes += len(inner)
        props = f["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"] == "Glomerulus"
        m = props["measurements"]
        assert m["Area um^2"] == pytest.approx(props["area_px"] * 0.0625, rel=1e-3) and m["Perimeter um"] > 0
        # the ring follows the pixel boundary a quarter pixel in: its area is within a pixel-ring of the pixels'
        assert polygon.area <= props["area_px"] + 1e-6
    # every hole of every object, made well-composed (corner junctions bridged), is an interior ring,
    # and the rings rasterise back onto those objects
    labels, _ = ndi.label(mask, structure=EIGHT)
    expected, n_holes = np.zeros(mask.shape, bool), 0
    for k in range(1, n + 1):
        piece = well_composed(labels == k)
        n_holes += ndi.label(ndi.binary_fill_holes(piece) & ~piece)[1]
        expected |= piece
    assert holes == n_holes > 0
    back = rasterise_features(features, mask.shape, scale=2.0)
    assert np.array_equal(back > 0, expected)


def test_well_composed_bridges_corner_only_junctions():
    mask = np.zeros((5, 5), bool)
    mask[1, 1] = mask[2, 2] = mask[1, 3] = True
    out = well_composed(mask)
    _, n4 = ndi.label(out)  # 4-connected: one piece now
    assert n4 == 1 and out.sum() == 4 and out[1, 2]  # one bridge serves both junctions


def test_geojson_is_streamed_to_a_valid_file_and_a_failed_write_leaves_nothing(tmp_path):
    mask = np.zeros((40, 40), np.uint8)
    mask[5:15, 5:15] = 1
    mask[20:30, 20:35] = 2
    path = tmp_path / "a.geojson"
    assert write_geojson(path, iter_features(mask, class_names={1: "A", 2: "B"})) == 2
    collection = json.loads(path.read_text())
    assert [f["properties"]["classification"]["name"] for f in collection["features"]] == ["A", "B"]

    def broken():
        yield from iter_features(mask)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_geojson(tmp_path / "b.geojson", broken())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.geojson"]


def test_one_pass_over_objects_writes_tables_and_overlay_that_agree_and_a_failed_pass_leaves_none(tmp_path):
    mask = np.zeros((40, 40), np.uint8)
    mask[5:15, 5:15] = 1  # 100 px of class 1
    mask[20:30, 20:35] = 2  # 150 px of class 2
    seeds = [(5, 5), (20, 20)]
    scale = 4.0  # level-0 pixels per mask pixel

    def objects():
        for seed in seeds:
            yield from trace_objects(mask, seed, (0, 0), scale)

    paths = {k: tmp_path / f"s.{k}" for k in ("geojson", "objects", "overlay")}
    thumb = np.full((40, 40, 3), 200, np.uint8)  # one thumbnail pixel per mask pixel
    tally = write_object_outputs(objects(), paths, (0.5, 0.5), {1: "A", 2: "B"}, thumb, 1 / scale)
    assert (tally.total, dict(tally.counts), tally.glomeruli) == (2, {"A": 1, "B": 1}, 1)
    assert tally.area_px == (100 + 150) * scale**2
    features = json.loads(paths["geojson"].read_text())["features"]
    assert [f["properties"]["name"] for f in features] == ["A 1", "B 2"]
    rows = paths["objects"].read_text().splitlines()
    assert rows[0].startswith("id,class,") and [r.split(",")[:2] for r in rows[1:]] == [
        ["1", "A"],
        ["2", "B"],
    ]
    drawn = np.any(np.asarray(PIL.Image.open(paths["overlay"])) != thumb, axis=-1)
    assert drawn[5, 10] and drawn[25, 20] and not drawn[10, 10] and not drawn[35, 5]
    summary = slide_summary("s", tally, 0.5, (160, 160), (0.5, 0.5))
    assert summary["object_count"] == 2 and summary["mean_area_um2"] == 125 * scale**2 * 0.25

    def broken():
        yield from objects()
        raise RuntimeError("disk full")

    for path in paths.values():
        path.unlink()
    with pytest.raises(RuntimeError):
        write_object_outputs(broken(), paths, (0.5, 0.5), {1: "A", 2: "B"}, thumb, 1 / scale)
    assert list(tmp_path.iterdir()) == []


def test_overlay_draws_outline_pixels_only_on_object_borders():
    thumb = np.full((60, 80, 3), 200, np.uint8)
    labels = np.zeros((60, 80), np.uint8)
    labels[20:40, 20:50] = 1
    out = draw_outlines(thumb, labels)
    changed = np.any(out != thumb, axis=-1)
    assert changed[20, 30] and not changed[30, 35] and not changed[5, 5]
    rings = [f["geometry"]["coordinates"][0] for f in mask_to_features(labels, scale=4.0)]
    drawn = np.any(draw_rings(thumb, rings, 0.25) != thumb, axis=-1)
    assert drawn[20, 30] and not drawn[30, 35] and not drawn[5, 5]


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_channel_argmax_matches_numpy_including_ties(classes):
    rng = np.random.default_rng(classes)
    probs = rng.integers(0, 3, size=(classes, 40, 50)).astype(np.float32)  # many ties
    assert np.array_equal(channel_argmax(probs), probs.argmax(0))
