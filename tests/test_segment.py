"""Whole-slide inference on real slide files, with networks whose right answer is known per pixel."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pytest
import torch
from cucim import CuImage

from custom.data.tiling import TissueTileSplitter
from custom.metrics.dice import dice_score
from custom.segment import WholeSlideInferer, list_slides, output_paths, segment_batch
from custom.wsi.geojson import rasterise_features
from custom.wsi.pyramid import pyramid_shapes, write_pyramid
from custom.wsi.reader import open_mask, open_slide

STAINED_BELOW = 0.8  # the stand-in network calls a pixel foreground when its red value is below this


class RedThreshold(torch.nn.Module):
    """A known function of the pixels: class 1 wherever red < 0.8, as confident logits."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the inferer a device to follow

    def forward(self, x):
        fg = (x[:, :1] < STAINED_BELOW).float()
        return torch.cat([1 - fg, fg], dim=1) * 10 + self.anchor


def expected_labels(slide, level, locations, tile):
    """The stand-in's answer inside the inferred tiles, 0 elsewhere, enlarged to level 0."""
    image = slide.read_level(level)
    answer = (image[..., 0] < STAINED_BELOW * 255).astype(np.uint8)
    covered = np.zeros(answer.shape, bool)
    for y, x in locations:
        covered[y : y + tile, x : x + tile] = True
    answer[~covered] = 0
    f = round(slide.downsamples[level])
    big = np.repeat(np.repeat(answer, f, 0), f, 1)
    h0, w0 = slide.level_shapes[0]
    return np.pad(big, ((0, max(0, h0 - big.shape[0])), (0, max(0, w0 - big.shape[1]))), mode="edge")[
        :h0, :w0
    ]


def exact(splitter, **kwargs):
    """An inferer that stitches exactly what the network says (no speck, pinhole or spur cleanup)."""
    return WholeSlideInferer(splitter, min_object_um2=0, max_hole_um2=0, smooth=False, **kwargs)


@pytest.fixture(scope="module")
def cmu_pyramid(slides_dir):
    return str(slides_dir / "derived" / "CMU-1-Small-Region.generic.tif")


@pytest.mark.parametrize(
    ("level", "tile", "overlap", "blend"),
    [(0, 384, 0, "constant"), (0, 256, 64, "gaussian"), (1, 256, 48, "constant"), (2, 128, 0, "gaussian")],
)
def test_stitching_is_exact_at_every_level_with_and_without_overlap(cmu_pyramid, level, tile, overlap, blend):
    splitter = TissueTileSplitter(patch_size=tile, overlap=overlap, level=level, progress=False)
    result = exact(splitter, batch_size=3, blend=blend)(cmu_pyramid, RedThreshold())
    try:
        plan = result.plan
        assert 0 < plan.tissue_tiles < plan.grid_tiles  # glass tiles were never read
        labels = result.store.labels[:]
        expected = expected_labels(plan.slide, level, plan.locations, tile)
        assert labels.shape == tuple(plan.slide.level_shapes[0])
        assert np.array_equal(labels, expected)  # no seam, no shifted tile, nothing outside the tiles
    finally:
        result.store.remove()


def test_segment_writes_a_pyramidal_mask_geojson_and_overlay_that_other_tools_open(cmu_pyramid, tmp_path):
    splitter = TissueTileSplitter(patch_size=512, level=0, progress=False)
    outcomes = segment_batch(cmu_pyramid, tmp_path, RedThreshold(), exact(splitter), progress=False)
    assert [o.status for o in outcomes] == ["done"]
    paths = output_paths(tmp_path, cmu_pyramid)
    assert paths["pred"].name == "CMU-1-Small-Region.generic_pred.tiff"
    slide = open_slide(cmu_pyramid)
    mask = open_mask(paths["pred"])
    assert mask.level_shapes[0] == slide.level_shapes[0]
    assert mask.mpp == pytest.approx(slide.mpp, rel=1e-4)
    assert len(mask.level_shapes) == len(pyramid_shapes(*slide.level_shapes[0]))
    cu = CuImage(str(paths["pred"]))
    assert cu.resolutions["level_count"] == mask.level_count
    assert tuple(openslide.OpenSlide(str(paths["pred"])).level_dimensions[0]) == slide.level_shapes[0][::-1]
    truth = expected_labels(slide, 0, splitter.plan(cmu_pyramid).locations, 512)
    assert np.array_equal(mask.read_level(0), truth)
    # the GeoJSON polygons rasterise back onto the mask
    collection = json.loads(paths["geojson"].read_text())
    assert collection["type"] == "FeatureCollection" and collection["features"]
    props = collection["features"][0]["properties"]
    assert props["classification"]["name"] == "Glomerulus" and props["area_um2"] > 0
    back = rasterise_features(collection["features"], truth.shape)
    assert dice_score(back, truth) > 0.98
    assert paths["overlay"].stat().st_size > 10_000
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_batch_reports_bad_slides_by_name_and_finishes_the_rest(slides_dir, cmu_pyramid, tmp_path, capsys):
    bad = [slides_dir / "negative" / "unreadable.svs", slides_dir / "negative" / "unopenable.tiff"]
    datalist = tmp_path / "slides.json"
    datalist.write_text(json.dumps([{"image": str(p)} for p in [bad[0], cmu_pyramid, bad[1]]]))
    splitter = TissueTileSplitter(patch_size=1024, level=1, progress=False)
    outcomes = segment_batch(
        datalist, tmp_path / "out", RedThreshold(), WholeSlideInferer(splitter), progress=False
    )
    status = {o.slide.rsplit("/", 1)[-1]: o for o in outcomes}
    assert status["CMU-1-Small-Region.generic.tif"].status == "done"
    assert status["unreadable.svs"].failed and "unreadable.svs" in status["unreadable.svs"].reason
    assert status["unopenable.tiff"].failed and "52479" in status["unopenable.tiff"].reason
    table = capsys.readouterr().out
    assert "3 slide(s): 1 ok, 2 failed" in table and "unopenable.tiff" in table
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "CMU-1-Small-Region.generic.geojson",
        "CMU-1-Small-Region.generic_overlay.png",
        "CMU-1-Small-Region.generic_pred.tiff",
    ]


def test_rerun_skips_finished_slides_unless_overwrite(cmu_pyramid, tmp_path):
    splitter = TissueTileSplitter(patch_size=1024, level=1, progress=False)
    inferer = WholeSlideInferer(splitter)
    first = segment_batch(cmu_pyramid, tmp_path, RedThreshold(), inferer, progress=False)
    stamp = output_paths(tmp_path, cmu_pyramid)["pred"].stat().st_mtime_ns
    again = segment_batch(cmu_pyramid, tmp_path, RedThreshold(), inferer, progress=False)
    assert [o.status for o in first] == ["done"] and [o.status for o in again] == ["skipped"]
    assert output_paths(tmp_path, cmu_pyramid)["pred"].stat().st_mtime_ns == stamp
    redo = segment_batch(cmu_pyramid, tmp_path, RedThreshold(), inferer, overwrite=True, progress=False)
    assert [o.status for o in redo] == ["done"]


def test_slide_without_tissue_gets_an_all_zero_mask_and_says_so(tmp_path):
    blank = tmp_path / "glass_wsi.tiff"
    shapes = [(1024, 1536), (512, 768)]
    write_pyramid(
        blank,
        shapes,
        lambda level, y, x, h, w: np.full((h, w, 3), 244, np.uint8),
        channels=3,
        mpp=0.5,
        compression="jpeg",
    )
    splitter = TissueTileSplitter(patch_size=512, level=0, progress=False)
    outcomes = segment_batch(
        blank, tmp_path / "out", RedThreshold(), WholeSlideInferer(splitter), progress=False
    )
    assert outcomes[0].status == "no tissue" and "no tissue" in outcomes[0].reason
    mask = open_mask(output_paths(tmp_path / "out", blank)["pred"])
    assert mask.level_shapes[0] == (1024, 1536) and not mask.read_level(0).any()


def test_folder_input_lists_slides_but_not_masks_or_predictions(tmp_path):
    for name in ("a_wsi.tiff", "a_mask.tiff", "a_wsi_pred.tiff", "b.svs", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.rsplit("/", 1)[-1] for p in list_slides(tmp_path)] == ["a_wsi.tiff", "b.svs"]


def test_cleanup_drops_specks_and_fills_pinholes_also_on_tile_seams(tmp_path):
    """A dark disc with pinholes (one on a tile seam) and a dark speck: after segmentation the
    disc is whole and the speck gone; at 0.5 um/px the 500 um^2 thresholds are 2000 px."""
    yy, xx = np.mgrid[:1024, :1536]
    dark = (yy - 512) ** 2 + (xx - 512) ** 2 < 300**2
    dark[400:403, 400:403] = False  # pinhole inside a tile
    dark[510:514, 510:514] = False  # pinhole on the seam of 512-px tiles
    dark[200:204, 1200:1204] = True  # a speck on glass... of tissue: 16 px
    tissue_band = (yy > 100) & (yy < 900) & (xx > 1000) & (xx < 1400)
    rgb = np.full((1024, 1536, 3), 245, np.uint8)  # glass
    rgb[tissue_band] = (215, 150, 200)  # pale stained tissue: saturated, red above the threshold
    rgb[dark] = (90, 40, 120)  # dark stain: red below 0.8 * 255, so "foreground"
    slide = tmp_path / "spots_wsi.tiff"
    shapes = [(1024, 1536), (512, 768)]
    levels = [rgb, rgb[::2, ::2]]
    write_pyramid(
        slide,
        shapes,
        lambda lv, y, x, h, w: levels[lv][y : y + h, x : x + w],
        channels=3,
        mpp=0.5,
        compression="lzw",
    )
    splitter = TissueTileSplitter(patch_size=512, level=0, progress=False)
    result = WholeSlideInferer(splitter)(str(slide), RedThreshold())
    try:
        labels = result.store.labels[:]
    finally:
        result.store.remove()
    assert labels[401, 401] == 1 and labels[511, 511] == 1  # both pinholes filled
    assert labels[201, 1201] == 0  # the speck is gone
    assert labels[512, 512] == 1 and labels[512, 900] == 0  # the disc itself is untouched
