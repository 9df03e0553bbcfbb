"""custom.outputs.pyramid: streamed pyramidal TIFFs that cuCIM, OpenSlide and tifffile all open."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
from cucim import CuImage

from custom.outputs.pyramid import pyramid_shapes, write_pyramid

MPP = 0.5
LEVEL0_HW = (1300, 1100)  # not a multiple of the tile, so every level has clipped edge tiles
MIN_SIDE = 300  # a small min_side gives several levels on a small image
TILE_PX = 256


def _rgb_source(level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Smooth gradients plus 64-px blocks: JPEG keeps it close, and every level differs."""
    yy, xx = np.mgrid[y : y + h, x : x + w]
    r = (xx * 0.2 + 30 * level) % 256
    g = np.where(((xx // 64) + (yy // 64)) % 2 == 0, 60, 200)
    b = (yy * 0.15 + 10) % 256
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


def _mask_source(level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Discs on a 97-px lattice (level-0 units), the kind of mask a segmenter writes."""
    scale = 2**level
    yy, xx = np.mgrid[y : y + h, x : x + w] * scale
    return ((((yy % 97) - 48) ** 2 + ((xx % 97) - 48) ** 2) < (30 + 5 * level) ** 2).astype(np.uint8)


def _expected(source, level: int, shape: tuple[int, int]) -> np.ndarray:
    return source(level, 0, 0, *shape)


@pytest.fixture(scope="module")
def pyramids(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pyramid")
    shapes = pyramid_shapes(*LEVEL0_HW, min_side=MIN_SIDE)
    rgb = write_pyramid(folder / "rgb.tiff", shapes, _rgb_source, channels=3, mpp=MPP, compression="jpeg")
    mask = write_pyramid(folder / "mask.tiff", shapes, _mask_source, channels=1, mpp=MPP, compression="lzw")
    return shapes, rgb, mask


def test_pyramid_shapes_halve_with_ceil_until_under_min_side():
    assert pyramid_shapes(6144, 8192) == [(6144, 8192), (3072, 4096), (1536, 2048), (768, 1024)]
    assert pyramid_shapes(1999, 100) == [(1999, 100)]
    assert pyramid_shapes(2001, 3) == [(2001, 3), (1001, 2)]
    assert pyramid_shapes(*LEVEL0_HW, min_side=MIN_SIDE) == [(1300, 1100), (650, 550), (325, 275), (163, 138)]


def test_every_level_is_a_tiled_top_level_page_with_its_mpp(pyramids):
    shapes, rgb, mask = pyramids
    for path, compression in ((rgb, tifffile.COMPRESSION.JPEG), (mask, tifffile.COMPRESSION.LZW)):
        with tifffile.TiffFile(path) as tif:
            assert len(tif.pages) == len(shapes)
            for level, (page, shape) in enumerate(zip(tif.pages, shapes, strict=True)):
                assert page.shape[:2] == shape
                assert page.is_tiled and (page.tilelength, page.tilewidth) == (TILE_PX, TILE_PX)
                assert page.compression == compression
                assert page.subfiletype == (0 if level == 0 else 1)
                assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
                num, den = page.tags["XResolution"].value
                assert 1e4 / (num / den) == pytest.approx(MPP * 2**level, rel=1e-6)
                if path == mask:
                    assert page.tags.get("Predictor") is None or page.tags["Predictor"].value == 1


def test_openslide_sees_every_level_and_the_mpp(pyramids):
    shapes, rgb, mask = pyramids
    for path in (rgb, mask):
        with openslide.OpenSlide(str(path)) as slide:
            assert slide.level_dimensions == tuple((w, h) for h, w in shapes)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP)
            assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(MPP)


def test_cucim_sees_every_level_and_the_mpp(pyramids):
    shapes, rgb, mask = pyramids
    for path in (rgb, mask):
        image = CuImage(str(path))
        assert image.resolutions["level_count"] == len(shapes)
        assert tuple(image.resolutions["level_dimensions"]) == tuple((w, h) for h, w in shapes)
        assert image.metadata["cucim"]["spacing"][:2] == pytest.approx([MPP, MPP])
        assert image.metadata["cucim"]["spacing_units"][:2] == ["micrometer", "micrometer"]


def test_rgb_pixels_match_the_source_within_jpeg_error_in_all_readers(pyramids):
    shapes, rgb, _ = pyramids
    image = CuImage(str(rgb))
    with openslide.OpenSlide(str(rgb)) as slide, tifffile.TiffFile(rgb) as tif:
        for level, (h, w) in enumerate(shapes):
            expected = _expected(_rgb_source, level, (h, w)).astype(np.int16)
            from_tifffile = tif.pages[level].asarray()
            from_openslide = np.asarray(slide.read_region((0, 0), level, (w, h)))[..., :3]
            from_cucim = np.asarray(image.read_region((0, 0), (w, h), level=level))[..., :3]
            for got in (from_tifffile, from_openslide, from_cucim):
                assert got.shape == (h, w, 3)
                err = np.abs(got.astype(np.int16) - expected)
                assert err.mean() < 3.0, f"level {level}: mean JPEG error {err.mean():.2f}"
                # Colour edges lose some chroma to 4:2:0 subsampling; nothing else should be off.
                assert np.percentile(err, 99) <= 32, f"level {level}: 99th-percentile error too large"
            # All three decode the same JPEG stream: they agree with each other almost exactly.
            assert np.abs(from_openslide.astype(np.int16) - from_tifffile).max() <= 2
            assert np.abs(from_cucim.astype(np.int16) - from_tifffile).max() <= 2


def test_mask_pixels_are_exact_in_all_readers(pyramids):
    shapes, _, mask = pyramids
    image = CuImage(str(mask))
    with openslide.OpenSlide(str(mask)) as slide, tifffile.TiffFile(mask) as tif:
        for level, (h, w) in enumerate(shapes):
            expected = _expected(_mask_source, level, (h, w))
            assert expected.any() and not expected.all()
            np.testing.assert_array_equal(tif.pages[level].asarray(), expected)
            # OpenSlide and cuCIM give a grey mask back as RGB(A) with equal channels.
            np.testing.assert_array_equal(
                np.asarray(slide.read_region((0, 0), level, (w, h)))[..., 0], expected
            )
            region = np.asarray(image.read_region((0, 0), (w, h), level=level))
            np.testing.assert_array_equal(region[..., 0], expected)


def test_tile_source_is_asked_only_for_regions_inside_the_level(tmp_path):
    shapes = pyramid_shapes(700, 1500, min_side=400)
    asked = []

    def source(level, y, x, h, w):
        asked.append((level, y, x, h, w))
        return np.full((h, w), level, np.uint8)

    write_pyramid(tmp_path / "m.tiff", shapes, source, channels=1, mpp=MPP, compression="lzw")
    for level, y, x, h, w in asked:
        lh, lw = shapes[level]
        assert 0 <= y < y + h <= lh and 0 <= x < x + w <= lw
        assert y % TILE_PX == 0 and x % TILE_PX == 0
    covered = {lvl: sum(h * w for lv, _, _, h, w in asked if lv == lvl) for lvl in range(len(shapes))}
    assert covered == {lvl: h * w for lvl, (h, w) in enumerate(shapes)}


def test_failed_write_leaves_no_file_and_keeps_the_previous_one(tmp_path):
    shapes = pyramid_shapes(900, 900, min_side=300)
    target = tmp_path / "slide.tiff"

    def broken(level, y, x, h, w):
        if level == 1:
            raise RuntimeError("renderer died")
        return _rgb_source(level, y, x, h, w)

    with pytest.raises(RuntimeError, match="renderer died"):
        write_pyramid(target, shapes, broken, channels=3, mpp=MPP, compression="jpeg")
    assert list(tmp_path.iterdir()) == []

    write_pyramid(target, shapes, _rgb_source, channels=3, mpp=MPP, compression="jpeg")
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match="renderer died"):
        write_pyramid(target, shapes, broken, channels=3, mpp=MPP, compression="jpeg")
    assert list(tmp_path.iterdir()) == [target]
    assert target.read_bytes() == before


def test_wrong_tile_shape_from_source_is_an_error_not_a_corrupt_file(tmp_path):
    def wrong(level, y, x, h, w):
        return np.zeros((h, w, 3), np.uint8)  # RGB for a 1-channel file

    with pytest.raises(ValueError, match="expected"):
        write_pyramid(tmp_path / "m.tiff", [(300, 300)], wrong, channels=1, mpp=MPP, compression="lzw")
    assert list(tmp_path.iterdir()) == []


def test_progress_bar_counts_tiles_of_all_levels(tmp_path, capsys):
    shapes = pyramid_shapes(600, 600, min_side=300)  # 9 + 4 + 1 tiles
    write_pyramid(
        tmp_path / "m.tiff", shapes, _mask_source, channels=1, mpp=MPP, compression="lzw", progress="mask"
    )
    err = capsys.readouterr().err
    assert "mask" in err and "/14 " in err


def test_unknown_mpp_writes_no_resolution_so_readers_do_not_invent_one(tmp_path):
    path = write_pyramid(
        tmp_path / "m.tiff", [(300, 300)], _mask_source, channels=1, mpp=None, compression="lzw"
    )
    with tifffile.TiffFile(path) as tif:
        unit = tif.pages[0].tags.get("ResolutionUnit")
        assert unit is None or unit.value == tifffile.RESUNIT.NONE
    with openslide.OpenSlide(str(path)) as slide:
        assert openslide.PROPERTY_NAME_MPP_X not in slide.properties


def test_float_tiles_for_a_uint8_file_are_refused_not_truncated_to_zero(tmp_path):
    def probabilities(level, y, x, h, w):
        return np.full((h, w), 0.7, np.float32)

    with pytest.raises(ValueError, match="float32"):
        write_pyramid(
            tmp_path / "p.tiff", [(300, 300)], probabilities, channels=1, mpp=MPP, compression="lzw"
        )
    assert list(tmp_path.iterdir()) == []
