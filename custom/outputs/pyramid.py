"""Streaming writer for pyramidal tiled TIFFs that cuCIM, OpenSlide and tifffile all open.

Every level is a top-level page (reduced levels marked subfiletype=1) carrying its own resolution
tags, because cuCIM and OpenSlide ignore SubIFD pyramids and take each level's mpp from its page.
Pixels come from a callback, one short horizontal block of tiles at a time, so memory depends on
the tile size and the number of worker threads, never on the slide size. The file appears at its
final path only once it is complete.

Compression that all three readers decode: "jpeg" for RGB slides; "lzw" (no predictor) for
1-channel masks (cuCIM cannot read 1-channel deflate, zstd or packbits).
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tifffile
from tqdm.auto import tqdm

from custom.io import atomic_write

TileSource = Callable[[int, int, int, int, int], np.ndarray]
"""tile_source(level, y, x, h, w) -> (h, w) or (h, w, channels) array, in that level's pixels."""

UM_PER_CM = 1e4
# A classic TIFF addresses at most 4 GiB; past this much raw pixel data we write BigTIFF, which
# all three readers open, rather than guess how well the tiles will compress.
CLASSIC_TIFF_MAX_RAW_BYTES = 2**31
BLOCK_TILES = 8  # tiles rendered per tile_source call: amortises per-call work, still ~1.5 MB RGB
ENCODE_BATCH_TILES = 32  # tifffile gathers this many tiles before handing them to its encoder threads


def pyramid_shapes(height: int, width: int, min_side: int = 2000) -> list[tuple[int, int]]:
    """Level shapes (h, w): level 0, then halved (rounding up) until the largest side is < min_side."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height} x {width}")
    shapes = [(int(height), int(width))]
    while max(shapes[-1]) >= min_side:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return shapes


def write_pyramid(
    path: str | os.PathLike,
    level_shapes: Sequence[tuple[int, int]],
    tile_source: TileSource,
    *,
    channels: int,
    mpp: float | None,
    compression: str,
    tile: int = 256,
    jpeg_quality: int = 90,
    description: str | None = None,
    progress: bool | str | None = None,
    workers: int | None = None,
    dtype: np.dtype | type = np.uint8,
) -> Path:
    """Write a pyramidal tiled TIFF, tile row by tile row, and return its path.

    Args:
        path: target file; written under a temporary name in the same folder, then renamed.
        level_shapes: (h, w) of each level, level 0 first; level L has mpp * 2**L um/px.
        tile_source: called as tile_source(level, y, x, h, w) for regions one tile row high and up
            to BLOCK_TILES tiles wide, always clipped to the level (edge regions are smaller than a
            tile; the writer pads them). Calls come from worker threads, possibly out of order.
        channels: 1 (stored min-is-black) or 3 (RGB).
        mpp: micrometres per pixel at level 0; None writes no resolution tags, so readers
            report the mpp as unknown rather than a made-up value.
        compression: "jpeg" (RGB slides, quality jpeg_quality) or "lzw" (masks); any tifffile codec.
        tile: tile side in pixels (a multiple of 16).
        description: ImageDescription of level 0.
        progress: show a tqdm bar over all tiles; a string also names the bar.
        workers: threads for tile_source and for encoding (default: CPU count).
    """
    path = Path(path)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    workers = workers or os.cpu_count() or 1
    dtype = np.dtype(dtype)
    sample_shape = () if channels == 1 else (channels,)
    raw_bytes = sum(h * w for h, w in level_shapes) * channels * dtype.itemsize
    total_tiles = sum(math.ceil(h / tile) * math.ceil(w / tile) for h, w in level_shapes)
    is_jpeg = compression.lower() == "jpeg"
    codec = (
        {"compression": "jpeg", "compressionargs": {"level": jpeg_quality}}
        if is_jpeg
        else {"compression": compression}
    )

    bar = tqdm(
        total=total_tiles,
        unit="tile",
        desc=progress if isinstance(progress, str) else path.name,
        disable=not progress,
        leave=False,
    )
    try:
        with (
            atomic_write(path) as tmp,
            ThreadPoolExecutor(workers, thread_name_prefix="pyramid-tiles") as pool,
            tifffile.TiffWriter(tmp, bigtiff=raw_bytes > CLASSIC_TIFF_MAX_RAW_BYTES) as tif,
        ):
            try:
                for level, (h, w) in enumerate(level_shapes):
                    resolution = {}
                    if mpp is not None:
                        px_per_cm = UM_PER_CM / (mpp * 2**level)
                        resolution = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
                    tiles = _level_tiles(
                        pool, tile_source, level, h, w, tile, sample_shape, dtype, is_jpeg, 2 * workers + 2
                    )
                    tif.write(
                        _counted(tiles, bar),
                        shape=(h, w, *sample_shape),
                        dtype=dtype,
                        tile=(tile, tile),
                        photometric="rgb" if channels == 3 else "minisblack",
                        subfiletype=0 if level == 0 else 1,
                        description=description if level == 0 else None,
                        metadata=None,
                        maxworkers=workers,
                        buffersize=ENCODE_BATCH_TILES * tile * tile * channels * dtype.itemsize,
                        **codec,
                        **resolution,
                    )
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()
    return path


def _level_tiles(
    pool: ThreadPoolExecutor,
    tile_source: TileSource,
    level: int,
    height: int,
    width: int,
    tile: int,
    sample_shape: tuple[int, ...],
    dtype: np.dtype,
    pad_by_edge: bool,
    lookahead_blocks: int,
) -> Iterator[np.ndarray]:
    """Yield the level's tiles in TIFF order (row-major), rendering a few blocks ahead in the pool."""
    block_px = tile * BLOCK_TILES
    blocks = ((y, x) for y in range(0, height, tile) for x in range(0, width, block_px))
    pending: deque[tuple[int, int, int, int, Future]] = deque()

    def submit_next() -> bool:
        for y, x in blocks:
            h, w = min(tile, height - y), min(block_px, width - x)
            pending.append((y, x, h, w, pool.submit(tile_source, level, y, x, h, w)))
            return True
        return False

    for _ in range(lookahead_blocks):
        if not submit_next():
            break
    while pending:
        y, x, h, w, future = pending.popleft()
        block = np.asarray(future.result())
        if block.dtype != dtype:
            integers = block.dtype.kind in "biu" and dtype.kind in "iu"  # labels: any integer type will do
            if not (integers or np.can_cast(block.dtype, dtype, "same_kind")):
                # Casting 0..1 probabilities to uint8 would silently write zeros.
                raise ValueError(
                    f"tile_source returned {block.dtype}, the file stores {dtype}: convert first"
                )
            block = block.astype(dtype)
        submit_next()
        expected = (h, w, *sample_shape)
        if block.shape != expected:
            if block.size != math.prod(expected):  # (h, w, 1) for a mask is fine; anything else is a bug
                raise ValueError(
                    f"tile_source{(level, y, x, h, w)} returned {block.shape}, expected {expected}"
                )
            block = block.reshape(expected)
        for x0 in range(0, w, tile):
            part = block[:, x0 : x0 + tile]
            if part.shape[:2] != (tile, tile):
                # JPEG blocks see the padding: repeating the edge avoids ringing in the last real pixels.
                pad = [(0, tile - part.shape[0]), (0, tile - part.shape[1])] + [(0, 0)] * len(sample_shape)
                part = np.pad(part, pad, mode="edge" if pad_by_edge else "constant")
            yield np.ascontiguousarray(part)


def _counted(tiles: Iterator[np.ndarray], bar: tqdm) -> Iterator[np.ndarray]:
    for part in tiles:
        yield part
        bar.update(1)
