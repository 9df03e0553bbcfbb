"""The three pixel sources behind `custom.wsi.reader.Slide`: cuCIM, OpenSlide and tifffile.

Each backend answers in level pixels only: `read(level, top, left, height, width)` returns the
(height, width, channels) uint8 pixels of a window that lies inside that level. Mapping MONAI's
level-0 locations onto levels, padding, and catching a backend's silent failures is the Slide's
job, so the three can be compared pixel for pixel.

`inspect_tiff` reads a TIFF's header with tifffile (no pixels) so the reader can decide which
backend may touch a file before cuCIM ever opens it.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from custom.errors import SlideError

# Pixel sizes outside this range are placeholders (72 dpi is 352.8 um/px), not a scanner's calibration.
MPP_SANE_RANGE_UM = (0.01, 100.0)
UM_PER_RESOLUTION_UNIT = {2: 25_400.0, 3: 10_000.0, 4: 1_000.0, 5: 1.0}  # TIFF inch, cm, mm, um
UM_PER_OME_UNIT = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}

# What cuCIM decodes on CPU, checked file by file: raw, LZW and JPEG tiles of 8-bit RGB. Deflate with
# predictor 2 kills the process (plain deflate reads, but it is one tag away from a crash, so tifffile
# takes it); packbits, ZSTD, WebP, JPEG 2000 and 1-channel pages raise or come back through a slow
# RGBA path, so they go elsewhere too.
JPEG = 7
CUCIM_COMPRESSIONS = {1: "none", 5: "LZW", JPEG: "JPEG"}
RGB_PHOTOMETRICS = {2, 6}  # RGB, YCbCr (JPEG tiles decode to RGB)
NO_PREDICTOR = 1
RGB_SAMPLES = 3
RGBA_SAMPLES = 4
OPAQUE = 255  # 8-bit alpha (and white)
# Formats whose layout only OpenSlide understands (tiles overlap, sparse tiles, several files, DICOM).
OPENSLIDE_SUFFIXES = {".dcm", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide"}
OPENSLIDE_TIFF_VENDORS = {"hamamatsu", "leica", "philips", "trestle", "ventana"}

JPEG_SOI, JPEG_SOS, JPEG_EOI = 0xD8, 0xDA, 0xD9
JPEG_STANDALONE_MARKERS = {0x01, *range(0xD0, 0xD8)}  # TEM and RST0-7 carry no length

AXIS_NAMES = {
    "C": "channels",
    "Z": "z-planes",
    "T": "time points",
    "I": "images",
    "Q": "planes",
    "S": "samples",
}


class BackendUnavailable(Exception):
    """This backend cannot open this file; another one may."""


@dataclass(frozen=True)
class TiffFacts:
    """What a TIFF header says about the first image series, read without decoding a pixel."""

    format_name: str
    vendor: str | None
    axes: str
    shape: tuple[int, ...]
    dtype: str
    photometrics: frozenset[int]
    compressions: frozenset[int]
    predictors: frozenset[int]
    all_tiled: bool
    planar_contiguous: bool
    pyramid_in_subifds: bool
    mpp: tuple[float, float] | None
    mpp_source: str
    mpp_note: str

    @property
    def is_rgb(self) -> bool:
        return (
            self.axes == "YXS"
            and self.shape[-1] in (RGB_SAMPLES, RGBA_SAMPLES)
            and self.dtype == "uint8"
            and self.photometrics <= RGB_PHOTOMETRICS
        )

    @property
    def is_mask(self) -> bool:
        return self.axes == "YX" and self.dtype in ("uint8", "bool")

    def describe(self) -> str:
        """E.g. 'an OME-TIFF of 3 channels x 5 z-planes of 167x439 int8 pixels (axes CZYX)'."""
        yx = self.axes.index("Y")
        planes = [
            f"{n} {AXIS_NAMES.get(a, a)}" for a, n in zip(self.axes, self.shape, strict=True) if a not in "YX"
        ]
        height, width = self.shape[yx], self.shape[yx + 1]
        stack = " x ".join(planes) + " of " if planes else ""
        article = "an" if self.format_name[0] in "AEIOU" else "a"
        return (
            f"{article} {self.format_name} of {stack}{height}x{width} {self.dtype} pixels (axes {self.axes})"
        )

    def cucim_refusal(self) -> str | None:
        """Why cuCIM must not open this file, or None when it reads it correctly."""
        if self.vendor in OPENSLIDE_TIFF_VENDORS:
            return f"a {self.vendor} TIFF, whose layout OpenSlide knows"
        if self.pyramid_in_subifds:
            return "its pyramid lies in SubIFDs, which cuCIM sees as a single level"
        if not self.is_rgb or self.shape[-1] != RGB_SAMPLES or not self.planar_contiguous:
            return "cuCIM reads interleaved 8-bit RGB only"
        if self.predictors != {NO_PREDICTOR}:
            return "it uses a TIFF predictor (deflate with predictor 2 crashes cuCIM)"
        unknown = sorted(self.compressions - CUCIM_COMPRESSIONS.keys())
        if unknown:
            return f"cuCIM does not read TIFF compression {_compression_name(unknown[0])} on CPU"
        if not self.all_tiled:
            return "it has untiled levels, which cuCIM reads through a slow RGBA path"
        return None


def inspect_tiff(path: str | Path) -> TiffFacts:
    """Header facts of a TIFF; raises tifffile.TiffFileError when the file is not one."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return tiff_facts(tif, path)


def tiff_facts(tif, path: str | Path) -> TiffFacts:
    series = tif.series[0]
    pages = [level.keyframe for level in series.levels]
    base = pages[0]
    format_name = "Aperio SVS" if tif.is_svs else "OME-TIFF" if tif.is_ome else "TIFF"
    mpp, source, note = _tiff_mpp(tif, base)
    return TiffFacts(
        format_name=format_name,
        vendor=_openslide_vendor(path),
        axes=series.axes,
        shape=tuple(series.shape),
        dtype=str(series.dtype),
        photometrics=frozenset(int(page.photometric) for page in pages),
        compressions=frozenset(int(page.compression) for page in pages),
        predictors=frozenset(int(page.predictor) for page in pages),
        all_tiled=all(page.is_tiled for page in pages),
        planar_contiguous=all(page.planarconfig == 1 for page in pages),
        pyramid_in_subifds=len(pages) > 1 and bool(base.subifds),
        mpp=mpp,
        mpp_source=source,
        mpp_note=note,
    )


def sane_mpp(mpp_y: float, mpp_x: float) -> bool:
    low, high = MPP_SANE_RANGE_UM
    return all(math.isfinite(v) and low <= v <= high for v in (mpp_y, mpp_x))


def _tiff_mpp(tif, page) -> tuple[tuple[float, float] | None, str, str]:
    """Level-0 (y, x) um/px from the Aperio description, resolution tags or OME-XML, in that order."""
    rejected = []
    for source, candidate in (
        ("aperio-description", _aperio_mpp(tif, page)),
        ("tiff-resolution", _resolution_mpp(page)),
        ("ome-xml", _ome_mpp(tif)),
    ):
        if isinstance(candidate, str):
            rejected.append(candidate)
        elif candidate is not None:
            if sane_mpp(*candidate):
                return candidate, source, f"{candidate[1]:g} um/px from the {source}"
            rejected.append(f"the {source} says {candidate[1]:.4g} um/px, outside the sane range {_range()}")
    return None, "none", "; ".join(rejected) or "the file records no pixel size"


def _aperio_mpp(tif, page) -> tuple[float, float] | None:
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description or "") if tif.is_svs else None
    return (float(match[1]),) * 2 if match else None


def _resolution_mpp(page) -> tuple[float, float] | str | None:
    if "XResolution" not in page.tags or "YResolution" not in page.tags:
        return None
    unit = int(page.resolutionunit)
    if unit not in UM_PER_RESOLUTION_UNIT:
        return "the TIFF resolution has no physical unit (ResolutionUnit NONE)"
    x_px_per_unit, y_px_per_unit = page.resolution
    if not x_px_per_unit or not y_px_per_unit:
        return "the TIFF resolution is zero"
    um = UM_PER_RESOLUTION_UNIT[unit]
    return um / y_px_per_unit, um / x_px_per_unit


def _ome_mpp(tif) -> tuple[float, float] | None:
    if not tif.is_ome:
        return None
    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        return None
    pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib or "PhysicalSizeY" not in pixels.attrib:
        return None
    sizes = []
    for axis in "YX":
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        if unit not in UM_PER_OME_UNIT:
            return None
        sizes.append(float(pixels.get(f"PhysicalSize{axis}")) * UM_PER_OME_UNIT[unit])
    return sizes[0], sizes[1]


def openslide_mpp(properties) -> tuple[tuple[float, float] | None, str, str]:
    try:
        mpp = float(properties["openslide.mpp-y"]), float(properties["openslide.mpp-x"])
    except (KeyError, ValueError):
        return None, "none", "OpenSlide finds no pixel size in the file"
    if sane_mpp(*mpp):
        return mpp, "openslide-property", f"{mpp[1]:g} um/px from OpenSlide's openslide.mpp-x/y"
    return None, "none", f"OpenSlide reports {mpp[1]:.4g} um/px, outside the sane range {_range()}"


def _range() -> str:
    return f"{MPP_SANE_RANGE_UM[0]}-{MPP_SANE_RANGE_UM[1]:g} um/px (a placeholder such as 72 dpi)"


def _compression_name(code: int) -> str:
    import tifffile

    try:
        return f"{tifffile.COMPRESSION(code).name} ({code})"
    except ValueError:
        return f"{code} (unknown)"


def _openslide_vendor(path: str | Path) -> str | None:
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:
        return None


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm")


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
        region = self._image.read_region(origin, (width, height), level)
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
