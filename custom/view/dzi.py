"""Deep Zoom (DZI) geometry and tiles of a slide or a label mask, read through `custom.wsi.reader`.

A DZI pyramid halves the level-0 image down to 1 x 1 px: level `max_level` is level 0 of the slide,
level L is 2**(max_level - L) times coarser. Each tile is `tile_px` square plus `overlap_px` on
every inner side. A tile is read from the coarsest slide level that is still at least as fine as
the tile, so no tile decodes more than about four times its own pixels on a pyramidal slide.

Three renderings: "slide" (RGB, JPEG or PNG), "mask" (label colours over a transparent background,
PNG) and "outline" (the boundary of a label mask in one colour, PNG; the ground-truth toggle).
"""

from __future__ import annotations

import io
import math
import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from custom.outputs.geojson import DEFAULT_COLOURS
from custom.wsi.reader import Slide

TILE_PX = 254  # with a 1-px overlap on both sides a tile is 256 px, the usual DZI choice
OVERLAP_PX = 1
JPEG_QUALITY = 85
PNG_COMPRESS_LEVEL = 1  # mask tiles are mostly one colour: fast compression loses almost nothing
# A tile never decodes more than this many slide pixels; only a slide without a pyramid gets near it
# (16 Mpx covers a whole 4096 x 4096 single-level image at every zoom).
MAX_READ_PX = 2**24
OUTLINE_RGB = (0, 230, 255)  # cyan: apart from the class colours and from stain colours
OPAQUE = 255
FORMATS = {"slide": ("jpeg", "png"), "mask": ("png",), "outline": ("png",)}


class TileNotFound(LookupError):
    """No such level or tile in this DZI pyramid (the server answers 404)."""


@dataclass(frozen=True)
class DziGeometry:
    """The DZI pyramid of a width x height level-0 image."""

    width: int
    height: int
    tile_px: int = TILE_PX
    overlap_px: int = OVERLAP_PX

    @property
    def max_level(self) -> int:
        return math.ceil(math.log2(max(self.width, self.height, 1)))

    def scale(self, level: int) -> int:
        """Level-0 pixels per pixel of DZI level `level`."""
        return 2 ** (self.max_level - level)

    def level_size(self, level: int) -> tuple[int, int]:
        """(width, height) of a DZI level."""
        if not 0 <= level <= self.max_level:
            raise TileNotFound(f"no level {level}; levels are 0-{self.max_level}")
        scale = self.scale(level)
        return math.ceil(self.width / scale), math.ceil(self.height / scale)

    def grid(self, level: int) -> tuple[int, int]:
        """(columns, rows) of tiles at a level."""
        width, height = self.level_size(level)
        return math.ceil(width / self.tile_px), math.ceil(height / self.tile_px)

    def tile_box(self, level: int, col: int, row: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a tile in that level's pixels, overlap included."""
        cols, rows = self.grid(level)
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFound(f"no tile {col}_{row} at level {level}; the grid is {cols} x {rows}")
        width, height = self.level_size(level)
        left = max(col * self.tile_px - self.overlap_px, 0)
        top = max(row * self.tile_px - self.overlap_px, 0)
        right = min((col + 1) * self.tile_px + self.overlap_px, width)
        bottom = min((row + 1) * self.tile_px + self.overlap_px, height)
        return left, top, right, bottom

    def xml(self, fmt: str) -> str:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
            f'Overlap="{self.overlap_px}" TileSize="{self.tile_px}">'
            f'<Size Width="{self.width}" Height="{self.height}"/></Image>\n'
        )


class DziImage:
    """One slide or mask file served as DZI tiles; safe to call from many server threads."""

    def __init__(self, slide: Slide, rendering: str):
        if rendering not in FORMATS:
            raise ValueError(f"rendering must be one of {sorted(FORMATS)}, got {rendering!r}")
        self.slide = slide
        self.rendering = rendering
        height, width = slide.level_shapes[0]
        self.geometry = DziGeometry(width, height)
        self.formats = FORMATS[rendering]
        # Backends keep one file handle per Slide: reads of one file take turns, encoding does not.
        self._lock = threading.Lock()

    @property
    def format(self) -> str:
        """The format the .dzi descriptor names."""
        return self.formats[0]

    def tile(self, level: int, col: int, row: int, fmt: str) -> bytes:
        """The encoded tile; TileNotFound for a level, tile or format this image does not have."""
        if fmt not in self.formats:
            raise TileNotFound(f"{self.rendering} tiles come as {' or '.join(self.formats)}, not {fmt}")
        box = self.geometry.tile_box(level, col, row)
        scale = self.geometry.scale(level)
        if self.rendering == "slide":
            image = Image.fromarray(self._region(box, scale, margin=0))
        elif self.rendering == "mask":
            image = Image.fromarray(LABEL_RGBA[self._region(box, scale, margin=0)], "RGBA")
        else:
            image = Image.fromarray(outline_rgba(self._region(box, scale, margin=1)), "RGBA")
        buffer = io.BytesIO()
        if fmt == "jpeg":
            image.save(buffer, "JPEG", quality=JPEG_QUALITY)
        else:
            image.save(buffer, "PNG", compress_level=PNG_COMPRESS_LEVEL)
        return buffer.getvalue()

    def _region(self, box: tuple[int, int, int, int], scale: int, margin: int) -> np.ndarray:
        """Pixels of a tile box (plus `margin` tile pixels all round), resampled to the tile's size."""
        left, top, right, bottom = (box[0] - margin, box[1] - margin, box[2] + margin, box[3] + margin)
        out_w, out_h = right - left, bottom - top
        level = source_level(self.slide.downsamples, scale)
        downsample = self.slide.downsamples[level]
        read_w = max(math.ceil(out_w * scale / downsample), 1)
        read_h = max(math.ceil(out_h * scale / downsample), 1)
        if read_w * read_h > MAX_READ_PX:
            raise TileNotFound(
                f"{self.slide.path}: a tile here would decode {read_w} x {read_h} px; the file has no "
                "pyramid level coarse enough for this zoom"
            )
        with self._lock:
            pixels = self.slide.read_region((top * scale, left * scale), (read_h, read_w), level)
        if (read_w, read_h) == (out_w, out_h):
            return pixels
        # Labels keep their values (nearest); stain colours are averaged over the pixels they cover.
        resample = Image.Resampling.BOX if self.rendering == "slide" else Image.Resampling.NEAREST
        return np.asarray(Image.fromarray(pixels).resize((out_w, out_h), resample))


def source_level(downsamples: list[float], scale: float) -> int:
    """The coarsest slide level whose downsample is at most `scale` (level 0 if none is coarser)."""
    fine_enough = [i for i, d in enumerate(downsamples) if d <= scale * (1 + 1e-6)]
    return max(fine_enough, key=lambda i: downsamples[i]) if fine_enough else 0


def label_colours() -> np.ndarray:
    """(256, 4) RGBA lookup: label 0 transparent, class c the GeoJSON's colour for c, opaque."""
    lut = np.zeros((256, 4), np.uint8)
    for label in range(1, 256):
        lut[label, :3] = DEFAULT_COLOURS[(label - 1) % len(DEFAULT_COLOURS)]
        lut[label, 3] = OPAQUE
    return lut


LABEL_RGBA = label_colours()


def outline_rgba(labels: np.ndarray) -> np.ndarray:
    """A 2-px outline (both sides of every label change) of labels with a 1-px margin; margin cut off."""
    change = np.zeros(labels.shape, bool)
    vertical = labels[1:, :] != labels[:-1, :]
    horizontal = labels[:, 1:] != labels[:, :-1]
    change[1:, :] |= vertical
    change[:-1, :] |= vertical
    change[:, 1:] |= horizontal
    change[:, :-1] |= horizontal
    change = change[1:-1, 1:-1]
    out = np.zeros((*change.shape, 4), np.uint8)
    out[change] = (*OUTLINE_RGB, OPAQUE)
    return out
