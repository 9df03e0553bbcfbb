"""A grey 8-bit PNG written band by band, so a gigapixel mask never has to be in memory at once.

Why our own writer: Pillow (and imageio through it) encodes a PNG only from a whole in-memory
image. A PNG is a signature, an IHDR chunk, zlib-compressed rows (each led by a filter byte) in
IDAT chunks and an IEND chunk; the standard library's zlib streams the rows.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
GREY_8BIT = (8, 0)  # bit depth, colour type 0 (greyscale)
FILTER_NONE = 0
UM_PER_M = 1_000_000


def write_grey_png(
    path: str | Path,
    shape: tuple[int, int],
    bands: Iterable[np.ndarray],
    mpp: float | None = None,
    level: int = 6,
) -> Path:
    """Write (height, width) rows arriving as uint8 bands, top to bottom; `mpp` sets pHYs (px per metre)."""
    height, width = int(shape[0]), int(shape[1])
    path = Path(path)
    rows = 0
    with open(path, "wb") as out:
        out.write(SIGNATURE)
        _chunk(out, b"IHDR", struct.pack(">IIBBBBB", width, height, *GREY_8BIT, 0, 0, 0))
        if mpp:
            per_metre = round(UM_PER_M / mpp)
            _chunk(out, b"pHYs", struct.pack(">IIB", per_metre, per_metre, 1))
        packer = zlib.compressobj(level)
        for band in bands:
            band = np.asarray(band, dtype=np.uint8)
            if band.ndim != 2 or band.shape[1] != width:
                raise ValueError(f"{path}: band of shape {band.shape} does not fit rows of width {width}")
            lead = np.full((band.shape[0], 1), FILTER_NONE, np.uint8)
            data = packer.compress(np.hstack([lead, band]).tobytes())
            if data:
                _chunk(out, b"IDAT", data)
            rows += band.shape[0]
        _chunk(out, b"IDAT", packer.flush())
        _chunk(out, b"IEND", b"")
    if rows != height:
        raise ValueError(f"{path}: got {rows} rows for an image {height} rows high")
    return path


def _chunk(out, kind: bytes, data: bytes) -> None:
    out.write(struct.pack(">I", len(data)) + kind + data)
    out.write(struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
