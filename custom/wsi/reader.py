"""Open whole-slide images and label masks safely, whichever library can read them.

`choose_backend` decides from the file's header, before cuCIM ever sees the file, because some
files (deflate with predictor 2) kill cuCIM's process rather than raise. cuCIM gets what it reads
correctly; tifffile the TIFFs it does not (and SubIFD pyramids, which only tifffile sees whole);
OpenSlide the vendor formats (DICOM, NDPI, MIRAX, ...). A `Slide` then gives one behaviour on
every backend: MONAI's (y, x) level-0 locations, exact level pixels, white padding outside the
image, the true mpp or None, and a `SlideError` naming the file instead of a crash or silent black.

`HoloWSIReader` puts a Slide behind MONAI's `BaseWSIReader`, so `PatchWSIDataset`,
`WSISlidingWindowSplitter` and `get_data(mpp=...)` work on any slide the reader opens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
from monai.data.wsi_reader import BaseWSIReader
from monai.utils import ensure_tuple

from custom.errors import ConfigError, SlideError
from custom.wsi.backends import CorruptTile, CuCIMBackend, OpenSlideBackend, TiffFileBackend
from custom.wsi.tiff_facts import (
    OPENSLIDE_SUFFIXES,
    OPENSLIDE_TIFF_VENDORS,
    RGB_SAMPLES,
    BackendUnavailable,
    TiffFacts,
    dicom_files,
    inspect_tiff,
)

log = logging.getLogger(__name__)

BACKENDS = ("cucim", "openslide", "tifffile")
SLIDE_PAD_VALUE = 255  # white glass
MASK_PAD_VALUE = 0  # background label
MASK_CHANNELS = 1
MAX_LEVEL_PIXELS = 2**26  # 64 Mpx, ~200 MB as RGB uint8: beyond this, read in regions
DEFAULT_MPP_RTOL = 0.05


def choose_backend(path: str | Path) -> str:
    """'cucim', 'openslide' or 'tifffile' for this file, decided without cuCIM touching it."""
    return _choose(Path(path))[0]


def _choose(path: Path) -> tuple[str, TiffFacts | None]:
    if not path.exists():
        raise SlideError(path, "no such file")
    if path.is_dir():
        if dicom_files(path):
            return "openslide", None
        raise SlideError(path, "a folder with no DICOM (.dcm) files in it; pass the slide file itself")
    if path.suffix.lower() in OPENSLIDE_SUFFIXES:
        return "openslide", None
    try:
        facts = inspect_tiff(path)
    except Exception:
        # Not a TIFF tifffile can parse: OpenSlide knows the remaining slide formats, or says why not.
        return "openslide", None
    if facts.cucim_refusal() is None:
        return "cucim", facts
    return ("openslide" if facts.vendor in OPENSLIDE_TIFF_VENDORS else "tifffile"), facts


def open_slide(path: str | Path, backend: str = "auto") -> Slide:
    """Open an RGB slide; 'auto' picks the backend and falls back when it cannot open the file."""
    if backend not in ("auto", *BACKENDS):
        raise ConfigError(f"unknown slide backend {backend!r}; use 'auto' or one of {', '.join(BACKENDS)}")
    source = _open_source(Path(path), backend, RGB_SAMPLES)
    return Slide(path, source.name, "slide", _source=source)


def open_mask(path: str | Path) -> Slide:
    """Open a 1-channel uint8 label mask (with tifffile, else OpenSlide; never cuCIM)."""
    source = _open_source(Path(path), "auto", MASK_CHANNELS)
    return Slide(path, source.name, "mask", _source=source)


def _open_source(path: Path, backend: str, channels: int):
    chosen, facts = _choose(path)
    if backend != "auto":
        order = [backend]
    elif channels == MASK_CHANNELS:
        order = ["tifffile", "openslide"]
    else:
        order = [chosen] + [name for name in ("openslide", "tifffile") if name != chosen]
    if order[0] == "cucim" and (refusal := _cucim_refusal(facts)):
        raise SlideError(path, f"cuCIM must not read this file: {refusal}; open it with backend='auto'")
    failures = []
    for name in order:
        try:
            if name == "cucim":
                return CuCIMBackend(path, facts)
            if name == "openslide":
                return OpenSlideBackend(path, channels)
            return TiffFileBackend(path, channels)
        except BackendUnavailable as err:
            failures.append(str(err))
    raise SlideError(path, "cannot open it: " + "; ".join(failures))


def _cucim_refusal(facts: TiffFacts | None) -> str | None:
    return "it is not a TIFF" if facts is None else facts.cucim_refusal()


class Slide:
    """One slide or mask file, read the same way whichever backend serves it.

    Pickles as (path, backend, kind) and reopens on first use, so DataLoader workers each get their
    own file handles; `close()` releases them the same way (the next read reopens).
    """

    def __init__(self, path: str | Path, backend: str, kind: str = "slide", _source=None):
        self.path = str(path)
        self.backend = backend
        self.kind = kind
        self._opened = _source
        self._fallback = None

    # ---- geometry and pixel size -------------------------------------------------------------

    @property
    def _source(self):
        if self._opened is None:
            self._opened = _open_source(Path(self.path), self.backend, self.channels)
        return self._opened

    @property
    def channels(self) -> int:
        return MASK_CHANNELS if self.kind == "mask" else RGB_SAMPLES

    @property
    def level_count(self) -> int:
        return len(self._source.level_shapes)

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        """(height, width) of every level."""
        return list(self._source.level_shapes)

    @property
    def downsamples(self) -> list[float]:
        """Level-0 pixels per level pixel, averaged over both axes as OpenSlide and cuCIM do."""
        (height0, width0), *_ = shapes = self._source.level_shapes
        return [(height0 / h + width0 / w) / 2 for h, w in shapes]

    @property
    def mpp(self) -> tuple[float, float] | None:
        """Level-0 (y, x) micrometres per pixel, or None when the file has no credible pixel size."""
        return self._source.mpp

    @property
    def mpp_source(self) -> str:
        return self._source.mpp_source

    @property
    def mpp_note(self) -> str:
        """Where the mpp came from, or why there is none (e.g. a 72-dpi placeholder)."""
        return self._source.mpp_note

    def level_mpp(self, level: int) -> tuple[float, float]:
        level = self._check_level(level)
        if self.mpp is None:
            raise SlideError(
                self.path, f"has no usable pixel size ({self.mpp_note}); select a level, not an mpp"
            )
        downsample = self.downsamples[level]
        return self.mpp[0] * downsample, self.mpp[1] * downsample

    def level_for_mpp(self, mpp: float, rtol: float = DEFAULT_MPP_RTOL) -> int:
        """The level nearest to `mpp` um/px within relative tolerance `rtol` (MONAI's matching)."""
        self.level_mpp(0)  # a SlideError saying why when the file has no pixel size
        try:
            return BaseWSIReader.get_valid_level(
                HoloWSIReader(mpp_rtol=rtol), self, level=None, mpp=mpp, power=None
            )
        except ValueError:
            available = ", ".join(f"{self.level_mpp(i)[1]:.4g}" for i in range(self.level_count))
            raise SlideError(
                self.path,
                f"no level is within {rtol:.0%} of {mpp} um/px; its levels are at {available} um/px",
            ) from None

    def _check_level(self, level: int) -> int:
        if not 0 <= int(level) < self.level_count:
            raise SlideError(self.path, f"has no level {level}; its levels are 0-{self.level_count - 1}")
        return int(level)

    # ---- pixels ------------------------------------------------------------------------------

    def read_region(
        self, location: Sequence[int], size: Sequence[int], level: int = 0, pad_value: int | None = None
    ) -> np.ndarray:
        """Pixels of `size` (h, w) at `level` whose top-left is `location` (y, x) in level-0 pixels.

        Returns (h, w, 3) uint8 for slides, (h, w) uint8 for masks. What lies outside the image is
        `pad_value` (white glass for slides, background for masks) on every backend.
        """
        level = self._check_level(level)
        y0, x0 = (int(v) for v in location)
        height, width = (int(v) for v in size)
        if height <= 0 or width <= 0:
            raise ValueError(f"region size must be positive, got {tuple(size)}")
        downsample = self.downsamples[level]
        # Half-up rounding inverts MONAI's splitter, which sends round(level_px * downsample).
        top, left = math.floor(y0 / downsample + 0.5), math.floor(x0 / downsample + 0.5)
        if pad_value is None:
            pad_value = MASK_PAD_VALUE if self.kind == "mask" else SLIDE_PAD_VALUE
        out = np.full((height, width, self.channels), pad_value, dtype=np.uint8)
        level_height, level_width = self.level_shapes[level]
        rows = max(top, 0), min(top + height, level_height)
        cols = max(left, 0), min(left + width, level_width)
        if rows[0] < rows[1] and cols[0] < cols[1]:
            out[rows[0] - top : rows[1] - top, cols[0] - left : cols[1] - left] = self._read_inside(
                level, rows, cols
            )
        return out[..., 0] if self.kind == "mask" else out

    def read_level(self, level: int, max_pixels: int = MAX_LEVEL_PIXELS) -> np.ndarray:
        """A whole level; refuses levels above `max_pixels` so a gigapixel level never lands in RAM."""
        level = self._check_level(level)
        height, width = self.level_shapes[level]
        if height * width > max_pixels:
            raise SlideError(
                self.path,
                f"level {level} is {height}x{width} = {height * width} pixels, above max_pixels={max_pixels}; "
                "read it in regions or pick a smaller level",
            )
        return self.read_region((0, 0), (height, width), level)

    def _read_inside(self, level: int, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
        window = (level, rows[0], cols[0], rows[1] - rows[0], cols[1] - cols[0])
        try:
            pixels = self._source.read(*window)
        except CorruptTile as err:
            return self._second_opinion(window, f"{err}, which cuCIM decodes to garbage without an error")
        except Exception as err:
            raise SlideError(
                self.path, f"reading {_where(*window)} with {self.backend} failed: {err}"
            ) from err
        if pixels.shape != (*window[3:], self.channels):
            raise SlideError(
                self.path, f"{self.backend} returned {pixels.shape} pixels for {_where(*window)}"
            )
        if self.backend == "cucim" and not pixels.any():
            # cuCIM turns a tile it cannot decode into black (or stale) pixels without raising.
            return self._second_opinion(window, "cuCIM returned all-black pixels")
        return pixels

    def _second_opinion(self, window: tuple[int, int, int, int, int], doubt: str) -> np.ndarray:
        """Re-read a window cuCIM may have got wrong; black that another decoder confirms is real."""
        where = _where(*window)
        try:
            fallback = self._fallback_source()
        except BackendUnavailable as err:
            raise SlideError(
                self.path, f"{where}: {doubt}, and no other backend can check it: {err}"
            ) from err
        try:
            pixels = fallback.read(*window)
        except Exception as err:
            raise SlideError(
                self.path, f"{where}: {doubt}; re-reading with {fallback.name} failed: {err}"
            ) from err
        if pixels.any():
            log.warning("%s: %s: %s; using %s's pixels instead", self.path, where, doubt, fallback.name)
        return pixels

    def _fallback_source(self):
        if self._fallback is None:
            failures = []
            for backend in (OpenSlideBackend, TiffFileBackend):
                try:
                    candidate = backend(self.path)
                except BackendUnavailable as err:
                    failures.append(str(err))
                    continue
                if candidate.level_shapes == self._source.level_shapes:
                    self._fallback = candidate
                    break
                failures.append(f"{candidate.name} sees other levels ({candidate.level_shapes})")
                candidate.close()
            else:
                raise BackendUnavailable("; ".join(failures))
        return self._fallback

    # ---- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        for source in (self._opened, self._fallback):
            if source is not None:
                source.close()
        self._opened = self._fallback = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"path": self.path, "backend": self.backend, "kind": self.kind}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["backend"], state["kind"])

    def __repr__(self) -> str:
        return f"Slide({self.path!r}, backend={self.backend!r}, kind={self.kind!r})"


def _where(level: int, top: int, left: int, height: int, width: int) -> str:
    return f"level {level}, rows {top}:{top + height}, cols {left}:{left + width}"


class HoloWSIReader(BaseWSIReader):
    """MONAI's WSI reader interface over `Slide`: use it as `reader=` wherever MONAI takes one.

    Args:
        slide_backend: 'auto' (default) or a backend name forced for every slide.
        kwargs: BaseWSIReader's (level, mpp, mpp_rtol, channel_dim, dtype, device, mode). mode='L'
            reads 1-channel label masks through `open_mask`.
    """

    supported_suffixes: ClassVar[list[str]] = [
        "svs",
        "tif",
        "tiff",
        *(s[1:] for s in sorted(OPENSLIDE_SUFFIXES)),
    ]
    backend = "holohisto"

    def __init__(self, slide_backend: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.slide_backend = slide_backend

    def read(self, data, **kwargs):
        backend = kwargs.pop("slide_backend", self.slide_backend)
        if kwargs:
            raise TypeError(f"HoloWSIReader.read got unexpected arguments {sorted(kwargs)}")
        opener = open_mask if self.mode == "L" else partial(open_slide, backend=backend)
        slides = [opener(path) for path in ensure_tuple(data)]
        return slides if len(slides) > 1 else slides[0]

    def get_size(self, wsi: Slide, level: int) -> tuple[int, int]:
        return wsi.level_shapes[level]

    def get_level_count(self, wsi: Slide) -> int:
        return wsi.level_count

    def get_downsample_ratio(self, wsi: Slide, level: int) -> float:
        return wsi.downsamples[level]

    def get_file_path(self, wsi: Slide) -> str:
        return str(Path(wsi.path).absolute())

    def get_mpp(self, wsi: Slide, level: int) -> tuple[float, float]:
        """The true (y, x) um/px of a level; SlideError when the file has none (MONAI's cuCIM says 1.0)."""
        return wsi.level_mpp(level)

    def get_power(self, wsi: Slide, level: int) -> float:
        raise ValueError(
            "HoloWSIReader selects levels by `level` or `mpp`, not by objective power, "
            "which is a scanner label rather than a pixel size"
        )

    def get_valid_level(self, wsi: Slide, level: int | None, mpp, power: int | None) -> int:
        """MONAI's level choice; when nothing fits, the error names the file."""
        try:
            return super().get_valid_level(wsi, level, mpp, power)
        except ValueError as err:
            raise SlideError(wsi.path, str(err)) from None

    def _get_patch(self, wsi: Slide, location, size, level: int, dtype, mode: str) -> np.ndarray:
        if mode not in ("RGB", "L"):
            raise ValueError(f"HoloWSIReader reads mode 'RGB' (slides) or 'L' (masks), not {mode!r}")
        patch = wsi.read_region(location, size, level)
        if patch.ndim == 2:
            patch = patch[..., None]
        return np.moveaxis(np.asarray(patch, dtype=dtype), -1, self.channel_dim)
