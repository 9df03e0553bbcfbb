"""What a TIFF's header says, read with tifffile (no pixels): levels, compression, channels, pixel size.

The reader decides from these facts which backend may touch a file before cuCIM ever opens it, and
every backend reports the pixel size the same way (or None, with the reason, when a file has only a
placeholder).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

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
