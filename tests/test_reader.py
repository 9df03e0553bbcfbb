"""The slide-reading layer on every real fixture file, through the real cuCIM, OpenSlide and tifffile.

generic-tiff/boxes.tiff kills any process in which cuCIM opens it, so in this process it is only ever
opened with an explicitly named safe backend; the automatic choice runs in a subprocess.
"""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from monai.data import PatchWSIDataset
from monai.inferers import WSISlidingWindowSplitter

from custom.errors import SlideError
from custom.wsi.backends import jpeg_header_problem
from custom.wsi.reader import HoloWSIReader, choose_backend, open_mask, open_slide

REPO = Path(__file__).resolve().parents[1]
CMU_MPP_UM = 0.499
CMU_LEVELS = [(2967, 2220), (1483, 1110), (741, 555), (370, 277)]
BOXES_LEVELS = [(250, 300), (125, 150), (62, 75), (31, 37)]
SMALL_LEVELS = [(16, 16)]
GLASS = 255
# The generic.tif levels were JPEG re-encoded from the SVS: allow that much mean error per pixel.
REENCODED_JPEG_MEAN_ERROR = 6.0

# Every file in slides/ that opens: backend chosen, (height, width) per level, level-0 mpp, its source.
OPENABLE = {
    "aperio/CMU-1-Small-Region.svs": ("cucim", CMU_LEVELS[:1], CMU_MPP_UM, "aperio-description"),
    "aperio/small.svs": ("cucim", SMALL_LEVELS, CMU_MPP_UM, "aperio-description"),
    "derived/CMU-1-Small-Region.generic.tif": ("cucim", CMU_LEVELS, CMU_MPP_UM, "tiff-resolution"),
    "derived/CMU-1-Small-Region.pyramid.ome.tif": ("tifffile", CMU_LEVELS, CMU_MPP_UM, "tiff-resolution"),
    "dicom/boxes_0.dcm": ("openslide", SMALL_LEVELS, CMU_MPP_UM, "openslide-property"),
    "dicom/boxes_1.dcm": ("openslide", SMALL_LEVELS, CMU_MPP_UM, "openslide-property"),
    "negative/unreadable.svs": ("cucim", SMALL_LEVELS, CMU_MPP_UM, "aperio-description"),
}
BOXES = "generic-tiff/boxes.tiff"  # checked in a subprocess: see test_boxes_tiff_*
REFUSED = {
    "negative/unopenable.tiff": ["52479", "compression"],
    "ome-tiff/multi-channel-z-series.ome.tif": ["not an RGB slide", "3 channels", "5 z-planes", "int8"],
}


def test_every_fixture_slide_has_an_expected_outcome(slides_dir):
    on_disk = {p.relative_to(slides_dir).as_posix() for p in slides_dir.rglob("*") if p.is_file()}
    assert on_disk - {"SHA256SUMS"} == {*OPENABLE, BOXES, *REFUSED}


@pytest.mark.parametrize("name", sorted(OPENABLE))
def test_fixture_opens_with_the_expected_backend_levels_and_mpp(slides_dir, name):
    backend, shapes, mpp_um, source = OPENABLE[name]
    path = slides_dir / name
    assert choose_backend(path) == backend
    with open_slide(path) as slide:
        assert slide.backend == backend
        assert slide.level_count == len(shapes)
        assert slide.level_shapes == shapes
        assert slide.mpp == pytest.approx((mpp_um, mpp_um))
        assert slide.mpp_source == source
        assert slide.channels == 3
        assert slide.downsamples[0] == 1.0


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unusable_fixture_fails_with_a_slide_error_naming_file_and_reason(slides_dir, name):
    with pytest.raises(SlideError) as err:
        open_slide(slides_dir / name)
    message = str(err.value)
    assert Path(name).name in message
    for words in REFUSED[name]:
        assert words in message


def test_multichannel_ome_tiff_goes_to_tifffile_which_alone_can_read_it(slides_dir):
    assert choose_backend(slides_dir / "ome-tiff/multi-channel-z-series.ome.tif") == "tifffile"


def test_unopenable_tiff_reports_why_each_backend_failed(slides_dir):
    with pytest.raises(
        SlideError, match=r"tifffile: no decoder .*52479.*OpenSlide: Unsupported TIFF compression"
    ):
        open_slide(slides_dir / "negative/unopenable.tiff")


def test_missing_file_is_a_slide_error_not_a_backend_crash(tmp_path):
    missing = tmp_path / "nope.svs"
    for call in (choose_backend, open_slide, open_mask):
        with pytest.raises(SlideError, match=r"nope\.svs: no such file"):
            call(missing)


def test_boxes_tiff_is_chosen_and_read_without_cucim_in_a_process_that_survives(slides_dir, tmp_path):
    # cuCIM segfaults on deflate + predictor 2: if the choice were wrong only this child would die.
    script = """
import json, sys
import numpy as np
from custom.errors import SlideError
from custom.wsi.reader import choose_backend, open_slide
path, out = sys.argv[1], sys.argv[2]
try:
    open_slide(path, backend="cucim")
    refusal = None
except SlideError as err:
    refusal = str(err)
slide = open_slide(path)
np.save(out, slide.read_region((0, 0), slide.level_shapes[0]))
print(json.dumps({"choice": choose_backend(path), "backend": slide.backend, "shapes": slide.level_shapes,
                  "mpp": slide.mpp, "note": slide.mpp_note, "refusal": refusal}))
"""
    path, pixels_file = slides_dir / BOXES, tmp_path / "level0.npy"
    run = subprocess.run(
        [sys.executable, "-c", script, str(path), str(pixels_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["choice"] == report["backend"] == "tifffile"
    assert [tuple(s) for s in report["shapes"]] == BOXES_LEVELS
    assert report["mpp"] is None
    assert "predictor" in report["refusal"] and "boxes.tiff" in report["refusal"]
    # Sane pixels: exactly what OpenSlide (the other decoder that reads this file) sees.
    openslide_view = open_slide(path, backend="openslide").read_level(0)
    assert np.array_equal(np.load(pixels_file), openslide_view)


def test_boxes_tiff_placeholder_resolution_gives_no_mpp_and_says_why(slides_dir):
    for backend in ("tifffile", "openslide"):
        slide = open_slide(slides_dir / BOXES, backend=backend)
        assert slide.level_shapes == BOXES_LEVELS
        assert slide.mpp is None
        assert slide.mpp_source == "none"
        assert "352.8" in slide.mpp_note and "placeholder" in slide.mpp_note
        with pytest.raises(SlideError, match=r"boxes\.tiff: has no usable pixel size"):
            slide.level_mpp(0)
        with pytest.raises(SlideError, match=r"boxes\.tiff"):
            HoloWSIReader().get_mpp(slide, 0)


def test_boxes_tiff_levels_agree_between_tifffile_and_openslide(slides_dir):
    by_tifffile = open_slide(slides_dir / BOXES, backend="tifffile")
    by_openslide = open_slide(slides_dir / BOXES, backend="openslide")
    # Level 1 has an exact downsample of 2, so OpenSlide lands on level pixels anywhere.
    for location in [(0, 0), (100, 38), (250, 300)]:
        a = by_tifffile.read_region(location, (40, 50), level=1)
        b = by_openslide.read_region(location, (40, 50), level=1)
        assert np.array_equal(a, b)
    for level in range(len(BOXES_LEVELS)):
        assert np.array_equal(by_tifffile.read_level(level), by_openslide.read_level(level))


def test_cucim_openslide_and_tifffile_agree_on_generic_tif_levels(slides_dir):
    path = slides_dir / "derived/CMU-1-Small-Region.generic.tif"
    cucim, openslide, tiff = (open_slide(path, backend=b) for b in ("cucim", "openslide", "tifffile"))
    for level, downsample in enumerate(tiff.downsamples):
        # Odd level-pixel origins, sent as MONAI's splitter sends them: round(level_px * downsample).
        for level_px in [(0, 0), (37, 101), (333, 250)]:
            location = tuple(round(v * downsample) for v in level_px)
            assert np.array_equal(
                cucim.read_region(location, (45, 61), level), tiff.read_region(location, (45, 61), level)
            )
        # OpenSlide resamples unless a location falls on a level pixel; the level origin always does.
        assert np.array_equal(
            openslide.read_region((0, 0), (64, 64), level), tiff.read_region((0, 0), (64, 64), level)
        )
    for location in [(1, 2), (1501, 999), (2900, 2100)]:
        assert np.array_equal(openslide.read_region(location, (50, 60)), tiff.read_region(location, (50, 60)))


def test_cmu_svs_reads_the_same_on_all_three_backends_and_matches_its_generic_copy(slides_dir):
    svs = slides_dir / "aperio/CMU-1-Small-Region.svs"
    views = [
        open_slide(svs, backend=b).read_region((1234, 567), (100, 120))
        for b in ("cucim", "openslide", "tifffile")
    ]
    assert np.array_equal(views[0], views[1]) and np.array_equal(views[0], views[2])
    copy = open_slide(slides_dir / "derived/CMU-1-Small-Region.generic.tif").read_region(
        (1234, 567), (100, 120)
    )
    assert np.abs(copy.astype(int) - views[0]).mean() < REENCODED_JPEG_MEAN_ERROR


def test_subifd_ome_pyramid_shows_all_levels_through_tifffile_only(slides_dir):
    ome = slides_dir / "derived/CMU-1-Small-Region.pyramid.ome.tif"
    assert open_slide(ome, backend="openslide").level_count == 1  # why auto picks tifffile here
    pyramid = open_slide(ome)
    generic = open_slide(slides_dir / "derived/CMU-1-Small-Region.generic.tif", backend="tifffile")
    assert pyramid.backend == "tifffile" and pyramid.level_count == len(CMU_LEVELS)
    for level in range(len(CMU_LEVELS)):
        # Both files hold the same 2x2 box-averaged levels, JPEG-encoded separately.
        difference = np.abs(pyramid.read_level(level).astype(int) - generic.read_level(level))
        assert difference.mean() < 1.0
        assert pyramid.level_mpp(level) == pytest.approx(generic.level_mpp(level))


def test_dicom_files_and_their_folder_open_as_one_slide_equal_to_the_svs_it_came_from(slides_dir):
    reference = open_slide(slides_dir / "aperio/small.svs").read_level(0)
    for target in ("dicom/boxes_0.dcm", "dicom/boxes_1.dcm", "dicom"):
        slide = open_slide(slides_dir / target)
        assert slide.backend == "openslide" and slide.level_shapes == SMALL_LEVELS
        assert np.array_equal(slide.read_level(0), reference)


def test_folder_without_dicom_files_is_refused(tmp_path):
    with pytest.raises(SlideError, match="no DICOM"):
        open_slide(tmp_path)


def test_out_of_bounds_padding_is_identical_on_every_backend(slides_dir):
    path = slides_dir / "derived/CMU-1-Small-Region.generic.tif"
    slides = [open_slide(path, backend=b) for b in ("cucim", "openslide", "tifffile")]
    height, width = CMU_LEVELS[0]
    for location, level in [((-10, -20), 0), ((height - 30, width - 25), 0), ((-40, -80), 2)]:
        regions = [s.read_region(location, (64, 64), level) for s in slides]
        for region in regions[1:]:
            assert np.array_equal(region, regions[0])
    top_left = slides[0].read_region((-10, -20), (64, 64))
    assert (top_left[:10] == GLASS).all() and (top_left[:, :20] == GLASS).all()
    assert not (top_left[10:, 20:] == GLASS).all()
    bottom_right = [s.read_region((height - 30, width - 25), (64, 64), pad_value=0) for s in slides]
    assert all((r[30:] == 0).all() and (r[:, 25:] == 0).all() for r in bottom_right)
    assert all((s.read_region((height + 5, 0), (8, 8)) == GLASS).all() for s in slides)


def test_unreadable_svs_corrupt_tile_raises_naming_file_level_region_and_fallback_reason(slides_dir):
    slide = open_slide(slides_dir / "negative/unreadable.svs")
    assert slide.backend == "cucim"
    with pytest.raises(SlideError) as err:
        slide.read_region((0, 0), (16, 16))
    message = str(err.value)
    for words in ("unreadable.svs", "level 0, rows 0:16, cols 0:16", "openslide", "Bogus marker length"):
        assert words in message


def test_unreadable_svs_is_caught_after_cucim_has_decoded_other_slides(slides_dir):
    # cuCIM leaves a tile it cannot decode as whatever its buffer held: zeros only in a fresh process.
    open_slide(slides_dir / "aperio/small.svs").read_level(0)
    open_slide(slides_dir / "aperio/CMU-1-Small-Region.svs").read_region((0, 0), (256, 256))
    slide = open_slide(slides_dir / "negative/unreadable.svs")
    for location, size in [((0, 0), (16, 16)), ((4, 4), (8, 8)), ((0, 0), (8, 8)), ((2, 2), (12, 12))]:
        with pytest.raises(SlideError, match=r"unreadable\.svs: .*broken JPEG header.*Bogus marker length"):
            slide.read_region(location, size)


def test_jpeg_header_check_flags_the_corrupt_tile_and_passes_a_valid_one(slides_dir):
    def first_tile(name):
        with tifffile.TiffFile(slides_dir / name) as tif:
            page = tif.pages[0]
            tif.filehandle.seek(page.dataoffsets[0])
            return tif.filehandle.read(page.databytecounts[0]), page.jpegtables

    good, tables = first_tile("aperio/small.svs")
    bad, _ = first_tile("negative/unreadable.svs")
    assert jpeg_header_problem(good) is None
    assert jpeg_header_problem(tables) is None
    assert jpeg_header_problem(bad) == "byte 35 should start a marker"
    assert jpeg_header_problem(b"not a jpeg") == "no JPEG start marker"


def test_black_region_confirmed_by_the_fallback_is_returned_quietly(tmp_path, caplog):
    image = np.full((128, 128, 3), 200, np.uint8)
    image[:64, :64] = 0
    path = tmp_path / "black_corner.tif"
    tifffile.imwrite(path, image, tile=(64, 64), compression="lzw", photometric="rgb", metadata=None)
    slide = open_slide(path)
    assert slide.backend == "cucim"
    with caplog.at_level(logging.WARNING):
        assert not slide.read_region((8, 8), (32, 32)).any()
    assert caplog.records == []
    assert np.array_equal(slide.read_level(0), image)


def test_level_mpp_and_level_for_mpp_follow_the_pyramid(slides_dir):
    slide = open_slide(slides_dir / "derived/CMU-1-Small-Region.generic.tif")
    assert slide.level_mpp(1) == pytest.approx((CMU_MPP_UM * 2.000337,) * 2, rel=1e-5)
    assert slide.level_for_mpp(0.5) == 0
    assert slide.level_for_mpp(1.0) == 1
    assert slide.level_for_mpp(4.0) == 3
    with pytest.raises(
        SlideError, match=r"generic\.tif: no level is within 5% of 0\.3 um/px.*0\.499, 0\.9982"
    ):
        slide.level_for_mpp(0.3)
    assert slide.level_for_mpp(0.45, rtol=0.2) == 0
    with pytest.raises(SlideError, match="has no level 4"):
        slide.read_region((0, 0), (8, 8), level=4)


@pytest.mark.parametrize(
    ("resolution", "unit", "mpp_um", "source"),
    [
        ((101_600, 101_600), "INCH", 0.25, "tiff-resolution"),
        ((40_000, 20_000), "CENTIMETER", (0.5, 0.25), "tiff-resolution"),
        ((72, 72), "INCH", None, "none"),
        ((1, 1), "NONE", None, "none"),
    ],
)
def test_tiff_resolution_tags_give_true_mpp_or_none(tmp_path, resolution, unit, mpp_um, source):
    path = tmp_path / "resolution.tif"
    image = np.full((32, 32, 3), 128, np.uint8)
    tifffile.imwrite(path, image, tile=(16, 16), resolution=resolution, resolutionunit=unit, metadata=None)
    slide = open_slide(path)
    expected = None if mpp_um is None else tuple(np.broadcast_to(mpp_um, 2))
    assert slide.mpp == (None if expected is None else pytest.approx(expected))
    assert slide.mpp_source == source


def test_ome_xml_pixel_size_is_used_when_resolution_tags_have_no_unit(tmp_path):
    path = tmp_path / "ome_only.ome.tif"
    image = np.full((32, 32, 3), 128, np.uint8)
    tifffile.imwrite(
        path,
        image,
        ome=True,
        tile=(16, 16),
        photometric="rgb",
        metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5},
    )
    slide = open_slide(path)
    assert slide.mpp == pytest.approx((0.5, 0.5))
    assert slide.mpp_source == "ome-xml"


def test_read_level_returns_small_levels_and_refuses_big_ones(slides_dir):
    slide = open_slide(slides_dir / "derived/CMU-1-Small-Region.generic.tif")
    assert slide.read_level(3).shape == (*CMU_LEVELS[3], 3)
    with pytest.raises(SlideError, match=r"generic\.tif: level 0 is 2967x2220"):
        slide.read_level(0, max_pixels=1_000_000)


def test_slide_pickles_as_its_path_and_reopens_on_first_use(slides_dir):
    slide = open_slide(slides_dir / "derived/CMU-1-Small-Region.generic.tif")
    expected = slide.read_region((500, 400), (32, 32), level=1)
    payload = pickle.dumps(slide)
    assert len(payload) < 1_000  # path and backend, no decoder state
    clone = pickle.loads(payload)
    assert clone.backend == "cucim" and clone._opened is None
    assert np.array_equal(clone.read_region((500, 400), (32, 32), level=1), expected)
    slide.close()
    assert np.array_equal(slide.read_region((500, 400), (32, 32), level=1), expected)


def _write_mask_pyramid(path: Path, labels: np.ndarray, mpp_um: float, levels: int) -> None:
    with tifffile.TiffWriter(path) as tif:
        for level in range(levels):
            scale = 2**level
            px_per_cm = 1e4 / (mpp_um * scale)
            tif.write(
                labels[::scale, ::scale],
                tile=(64, 64),
                compression="lzw",
                photometric="minisblack",
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=1 if level else 0,
                metadata=None,
            )


@pytest.fixture
def mask_path(tmp_path):
    labels = np.zeros((301, 403), np.uint8)
    labels[50:120, 60:200] = 1
    labels[200:, 300:] = 2
    path = tmp_path / "case_mask.tiff"
    _write_mask_pyramid(path, labels, mpp_um=0.25, levels=3)
    return path, labels


def test_mask_pyramid_reads_exact_labels_at_every_level(mask_path):
    path, labels = mask_path
    assert choose_backend(path) == "tifffile"
    mask = open_mask(path)
    assert (mask.backend, mask.channels, mask.level_count) == ("tifffile", 1, 3)
    assert mask.level_shapes == [(301, 403), (151, 202), (76, 101)]
    assert mask.mpp == pytest.approx((0.25, 0.25)) and mask.mpp_source == "tiff-resolution"
    assert mask.level_for_mpp(1.0) == 2
    for level in range(3):
        assert np.array_equal(mask.read_level(level), labels[:: 2**level, :: 2**level])
    region = mask.read_region((290, 390), (20, 20))
    assert region.shape == (20, 20) and region.dtype == np.uint8
    assert (region[:11, :13] == 2).all() and (region[11:] == 0).all() and (region[:, 13:] == 0).all()


def test_masks_and_slides_are_not_mistaken_for_each_other(mask_path, slides_dir):
    with pytest.raises(SlideError, match=r"not an RGB slide.*open_mask"):
        open_slide(mask_path[0])
    with pytest.raises(SlideError, match=r"small\.svs: not a 1-channel label mask"):
        open_mask(slides_dir / "aperio/small.svs")


def test_holo_reader_reads_masks_as_one_channel_in_mode_l(mask_path):
    path, labels = mask_path
    reader = HoloWSIReader(mode="L")
    patch, meta = reader.get_data(reader.read(path), location=(40, 50), size=(30, 40))
    assert patch.shape == (1, 30, 40)
    assert np.array_equal(patch[0], labels[40:70, 50:90])
    assert meta["backend"] == "holohisto"


def test_patch_wsi_dataset_reads_patches_through_holo_reader(slides_dir):
    svs = str(slides_dir / "aperio/CMU-1-Small-Region.svs")
    generic = str(slides_dir / "derived/CMU-1-Small-Region.generic.tif")
    data = [
        {"image": svs, "location": [100, 200], "label": 1},
        {"image": generic, "location": [1000, 500], "label": 0, "level": 1},
    ]
    dataset = PatchWSIDataset(data, patch_size=64, reader=HoloWSIReader, center_location=False)
    first, second = dataset[0], dataset[1]
    assert first["image"].shape == (3, 64, 64) and float(first["label"]) == 1.0
    assert first["image"].meta["backend"] == "holohisto"
    expected = open_slide(svs).read_region((100, 200), (64, 64))
    assert np.array_equal(first["image"].numpy(), np.moveaxis(expected, -1, 0))
    expected = open_slide(generic).read_region((1000, 500), (64, 64), level=1)
    assert np.array_equal(second["image"].numpy(), np.moveaxis(expected, -1, 0))


def test_get_data_selects_levels_by_true_mpp(slides_dir):
    reader = HoloWSIReader(channel_dim=-1)
    svs = reader.read(slides_dir / "aperio/CMU-1-Small-Region.svs")
    patch, meta = reader.get_data(svs, location=(10, 20), size=(32, 32), mpp=0.5)
    assert meta["level"] == 0 and patch.shape == (32, 32, 3)
    assert np.array_equal(patch, svs.read_region((10, 20), (32, 32)))
    with pytest.raises(SlideError, match=r"CMU-1-Small-Region\.svs: .*available mpp: \[\(0\.499, 0\.499\)\]"):
        reader.get_data(svs, location=(0, 0), size=(32, 32), mpp=2.0)
    generic = reader.read(slides_dir / "derived/CMU-1-Small-Region.generic.tif")
    patch, meta = reader.get_data(generic, location=(400, 400), size=(32, 32), mpp=1.0)
    assert meta["level"] == 1
    assert np.array_equal(patch, generic.read_region((400, 400), (32, 32), level=1))
    with pytest.raises(ValueError, match="not by objective power"):
        reader.get_power(svs, 0)


def test_sliding_window_splitter_tiles_a_level_and_pads_the_edges_white(slides_dir):
    path = slides_dir / "derived/CMU-1-Small-Region.generic.tif"
    with pytest.warns(UserWarning, match="holohisto backend"):  # MONAI warns for any reader it does not know
        splitter = WSISlidingWindowSplitter(patch_size=256, reader=HoloWSIReader, level=2)
    patches = list(splitter(str(path)))
    level_height, level_width = CMU_LEVELS[2]
    assert len(patches) == 3 * 3  # ceil(741 / 256) x ceil(555 / 256)
    slide = open_slide(path)
    downsample = slide.downsamples[2]
    for patch, (top, left) in patches:
        location = (round(top * downsample), round(left * downsample))
        assert np.array_equal(
            patch[0].numpy(), np.moveaxis(slide.read_region(location, (256, 256), 2), -1, 0)
        )
    last, (top, left) = patches[-1]
    assert (last[0, :, level_height - top :, :] == GLASS).all()
    assert (last[0, :, :, level_width - left :] == GLASS).all()
