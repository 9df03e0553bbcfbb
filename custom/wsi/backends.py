"""The three pixel sources behind `custom.wsi.reader.Slide`: cuCIM, OpenSlide and tifffile.

Each backend answers in level pixels only: `read(level, top, left, height, width)` returns the
(height, width, channels) uint8 pixels of a window that lies inside that level. Mapping MONAI's
level-0 locations onto levels, padding, and catching a backend's silent failures is the Slide's
job, so the three can be compared pixel for pixel.

Which backend a file goes to is decided from its header (`custom.wsi.tiff_facts`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from custom.errors import SlideError
from custom.wsi.tiff_facts import (
    JPEG,
    OPAQUE,
    RGB_SAMPLES,
    BackendUnavailable,
    TiffFacts,
    _compression_name,
    dicom_files,
    openslide_mpp,
    tiff_facts,
)

# cuCIM decodes a large region's tiles on its own threads (a 4K tile is 256 JPEG tiles); the reader
# pool already runs regions side by side, so each gets a share of the host's cores.
CUCIM_PARALLEL_PX = 2**20
CUCIM_READ_WORKERS = max(1, min(4, (os.cpu_count() or 1) // 4))

JPEG_SOI, JPEG_SOS, JPEG_EOI = 0xD8, 0xDA, 0xD9
JPEG_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 carry no length


class CuCIMBackend:
    """cuCIM: the fast path; only ever given files `TiffFacts.cucim_refusal` passed."""

    name = "cucim"
    channels = RGB_SAMPLES

    def __init__(self, path: str | Path, facts: TiffFacts):
        from cucim import CuImage

        try:
            self._image = CuImage(str(path))
        except Exception as err:
            raise BackendUnavailable(f"cuCIM: {err}") from err
        resolutions = self._image.resolutions
        self.level_shapes = [(int(h), int(w)) for w, h in resolutions["level_dimensions"]]
        self._downsamples = [float(d) for d in resolutions["level_downsamples"]]
        self.mpp, self.mpp_source, self.mpp_note = facts.mpp, facts.mpp_source, facts.mpp_note
        try:
            self._tiles = JpegTileCheck(path) if JPEG in facts.compressions else None
        except BaseException:
            self._image.close()
            raise
        if self._tiles is not None and self._tiles.level_shapes != self.level_shapes:
            self.close()
            raise BackendUnavailable(
                f"cuCIM sees levels {self.level_shapes}, the TIFF header {self._tiles.level_shapes}"
            )

    def read(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        if self._tiles is not None:
            self._tiles.check(level, top, left, height, width)
        downsample = self._downsamples[level]
        origin = (_cucim_level0(left, downsample), _cucim_level0(top, downsample))
        workers = CUCIM_READ_WORKERS if height * width >= CUCIM_PARALLEL_PX else 0
        region = self._image.read_region(origin, (width, height), level, num_workers=workers)
        return np.asarray(region)[..., :RGB_SAMPLES]

    def close(self) -> None:
        self._image.close()
        if self._tiles is not None:
            self._tiles.close()


def _cucim_level0(level_px: int, downsample: float) -> int:
    """The level-0 coordinate cuCIM turns into `level_px` on a level.

    cuCIM divides the int64 level-0 coordinate by a float32 downsample and truncates, so the
    inverse is searched in the same float32 arithmetic rather than guessed.
    """
    ds = np.float32(downsample)

    def landing(level0: int) -> int:
        return int(np.float32(level0) / ds)

    level0 = math.ceil(level_px * float(ds))
    while level0 > 0 and landing(level0 - 1) >= level_px:
        level0 -= 1
    while landing(level0) < level_px:
        level0 += 1
    return level0


class CorruptTile(Exception):
    """A tile cuCIM would decode into garbage without saying so."""


class JpegTileCheck:
    """Finds JPEG tiles whose headers libjpeg rejects, before cuCIM decodes them.

    cuCIM does not raise on such a tile: it hands back the untouched output buffer, which is zeros in
    a fresh process and stale pixels of earlier reads later, so looking at the pixels is not enough.
    Walking a tile's markers costs one small read; each tile is checked once per process.
    """

    def __init__(self, path: str | Path):
        import tifffile

        self._layouts = []
        with tifffile.TiffFile(path) as tif:
            for index, level in enumerate(tif.series[0].levels):
                page = level.keyframe
                if page.jpegtables and (problem := jpeg_header_problem(page.jpegtables)):
                    raise BackendUnavailable(
                        f"cuCIM: the JPEG tables of level {index} are broken ({problem})"
                    )
                tiles_across = -(-page.imagewidth // page.tilewidth)
                offsets = np.asarray(page.dataoffsets, dtype=np.int64)
                counts = np.asarray(page.databytecounts, dtype=np.int64)
                self._layouts.append((page.tilelength, page.tilewidth, tiles_across, offsets, counts))
            self.level_shapes = [(int(lv.shape[0]), int(lv.shape[1])) for lv in tif.series[0].levels]
        self._checked = [np.zeros(len(layout[3]), dtype=bool) for layout in self._layouts]
        self._fd = os.open(path, os.O_RDONLY)

    def check(self, level: int, top: int, left: int, height: int, width: int) -> None:
        tile_h, tile_w, tiles_across, offsets, counts = self._layouts[level]
        rows = np.arange(top // tile_h, (top + height - 1) // tile_h + 1)
        cols = np.arange(left // tile_w, (left + width - 1) // tile_w + 1)
        tiles = (rows[:, None] * tiles_across + cols[None, :]).ravel()
        for tile in tiles[~self._checked[level][tiles]]:
            if counts[tile] == 0:
                raise CorruptTile(f"tile {tile} is empty in the file")
            problem = jpeg_header_problem(os.pread(self._fd, int(counts[tile]), int(offsets[tile])))
            if problem:
                raise CorruptTile(f"tile {tile} has a broken JPEG header ({problem})")
            self._checked[level][tile] = True

    def close(self) -> None:
        os.close(self._fd)


def jpeg_header_problem(stream: bytes) -> str | None:
    """Why libjpeg would reject this stream's header (markers up to the scan), or None."""
    if stream[:2] != bytes((0xFF, JPEG_SOI)):
        return "no JPEG start marker"
    pos = 2
    while pos + 2 <= len(stream):
        if stream[pos] != 0xFF:
            return f"byte {pos} should start a marker"
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker in (JPEG_SOS, JPEG_EOI):  # image data begins, or a tables-only stream ends
            return None
        elif marker in JPEG_STANDALONE_MARKERS:
            pos += 2
        else:
            length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
            if length < 2 or pos + 2 + length > len(stream):
                return f"marker 0x{marker:02X} at byte {pos} has a bogus length"
            pos += 2 + length
    return "the header ends before any image data"


class OpenSlideBackend:
    """OpenSlide: DICOM, NDPI, MIRAX and vendor TIFFs; also the second opinion on cuCIM's black tiles."""

    name = "openslide"

    def __init__(self, path: str | Path, channels: int = RGB_SAMPLES):
        import openslide

        path = Path(path)
        if path.is_dir():
            # OpenSlide opens a DICOM slide from any one of its files and finds the others beside it.
            files = dicom_files(path)
            if not files:
                raise BackendUnavailable("OpenSlide: the folder holds no DICOM (.dcm) files")
            path = files[0]
        try:
            self._slide = openslide.OpenSlide(str(path))
        except Exception as err:
            raise BackendUnavailable(f"OpenSlide: {err}") from err
        self.channels = channels
        self.level_shapes = [(int(h), int(w)) for w, h in self._slide.level_dimensions]
        self._downsamples = list(self._slide.level_downsamples)
        self.mpp, self.mpp_source, self.mpp_note = openslide_mpp(self._slide.properties)

    def read(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        # OpenSlide takes level-0 coordinates and resamples when they do not fall on a level pixel;
        # with the integer downsamples of DICOM, NDPI and MIRAX pyramids this lands exactly.
        downsample = self._downsamples[level]
        origin = (round(left * downsample), round(top * downsample))
        rgba = np.asarray(self._slide.read_region(origin, level, (width, height)))
        rgb, alpha = rgba[..., :RGB_SAMPLES], rgba[..., RGB_SAMPLES:]
        if alpha.min() < OPAQUE:
            # Transparent pixels are areas the scanner skipped: show them as glass.
            weight = alpha / OPAQUE
            rgb = np.rint(rgb * weight + OPAQUE * (1.0 - weight)).astype(np.uint8)
        return rgb[..., : self.channels]

    def close(self) -> None:
        self._slide.close()


class TiffFileBackend:
    """tifffile: everything TIFF that cuCIM must not touch, SubIFD pyramids, and label masks."""

    name = "tifffile"

    def __init__(self, path: str | Path, channels: int = RGB_SAMPLES):
        import tifffile
        import zarr

        try:
            self._tif = tifffile.TiffFile(path)
            facts = tiff_facts(self._tif, path)
        except Exception as err:
            raise BackendUnavailable(f"tifffile: {err}") from err
        try:
            self._check(path, facts, channels)
            series = self._tif.series[0]
            # Regions go through tifffile's zarr store, which decodes only the tiles a window touches;
            # TiffFile.asarray (and MONAI's TiffFileWSIReader) decodes a whole level for every patch.
            self._store = series.aszarr()
            root = zarr.open(self._store, mode="r")
            self._levels = (
                [root[str(i)] for i in range(len(series.levels))] if len(series.levels) > 1 else [root]
            )
        except BaseException:
            self._tif.close()
            raise
        self.channels = channels
        self.level_shapes = [tuple(int(n) for n in level.shape[:2]) for level in self._levels]
        self.mpp, self.mpp_source, self.mpp_note = facts.mpp, facts.mpp_source, facts.mpp_note

    @staticmethod
    def _check(path, facts: TiffFacts, channels: int) -> None:
        import tifffile

        if channels == RGB_SAMPLES and not facts.is_rgb:
            hint = "; a label mask opens with open_mask" if facts.is_mask else ""
            raise SlideError(path, f"not an RGB slide: {facts.describe()}{hint}")
        if channels == 1 and not facts.is_mask:
            raise SlideError(path, f"not a 1-channel label mask: {facts.describe()}")
        for code in sorted(facts.compressions):
            if code not in tifffile.TIFF.DECOMPRESSORS:
                raise BackendUnavailable(
                    f"tifffile: no decoder for TIFF compression {_compression_name(code)}"
                )

    def read(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        pixels = np.asarray(self._levels[level][top : top + height, left : left + width])
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        return pixels[..., : self.channels].astype(np.uint8, copy=False)

    def close(self) -> None:
        self._store.close()
        self._tif.close()
