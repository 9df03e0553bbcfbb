"""The stitched mask as a pyramidal label TIFF with the slide's level-0 geometry, encoded from the inference level.

Inference often runs coarser than level 0 (the tiny net at level 1, KPIs at 20X). The file still
has the slide's level-0 size, so viewers overlay it on the slide and evaluation compares it pixel
for pixel, but no level-0 image is ever built: each output tile is cut from the inference-level
cells and its pixels repeated only while it is encoded. Levels coarser than the inference level are
2 x 2 max-pooled from it (an object stays visible when zoomed out). All-background and single-label
tiles, most of a mask, are encoded once and their bytes reused; the rest are LZW-encoded on a pool
of threads. LZW without predictor, 1 channel: cuCIM, OpenSlide and tifffile all read it.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from tqdm.auto import tqdm

from custom.inference.chunks import ChunkedMask
from custom.io import atomic_write
from custom.outputs.pyramid import CLASSIC_TIFF_MAX_RAW_BYTES, UM_PER_CM, pyramid_shapes

TILE_PX = 256
LOOKAHEAD_TILES = 256  # tiles encoded ahead of the file writer


def write_label_pyramid(
    path: str | os.PathLike,
    labels: ChunkedMask,
    factor: int,
    shape0: tuple[int, int],
    mpp: float | None,
    workers: int | None = None,
    progress: bool | str = False,
) -> Path:
    """Write `labels` (the inference level, `factor` level-0 pixels per pixel) as a level-0 pyramid.

    Level-0 rows and columns past the inference level's last pixel (level sizes are rounded down)
    repeat its edge.
    """
    path = Path(path)
    factor = max(1, int(factor))
    native = int(math.log2(factor))  # the output level the inference level is closest to, from below
    shapes = pyramid_shapes(*shape0)
    workers = workers or os.cpu_count() or 1
    sources = [labels]
    total = sum(math.ceil(h / TILE_PX) * math.ceil(w / TILE_PX) for h, w in shapes)
    bar = tqdm(
        total=total,
        unit="tile",
        desc=progress if isinstance(progress, str) else path.name,
        leave=False,
        disable=not progress,
    )
    encoded: dict[int, bytes] = {}
    try:
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="mask-tiles") as pool,
            atomic_write(path) as tmp,
            tifffile.TiffWriter(
                tmp, bigtiff=sum(h * w for h, w in shapes) > CLASSIC_TIFF_MAX_RAW_BYTES
            ) as tif,
        ):
            for level, (h, w) in enumerate(shapes):
                pooled = max(0, level - native)
                while len(sources) <= pooled:
                    sources.append(sources[-1].halved())
                source = sources[pooled]
                cut = _tile_cutter(source, factor * 2**pooled, 2**level, encoded)
                tiles = (
                    (y, x, min(TILE_PX, h - y), min(TILE_PX, w - x))
                    for y in range(0, h, TILE_PX)
                    for x in range(0, w, TILE_PX)
                )
                resolution = {}
                if mpp is not None:
                    px_per_cm = UM_PER_CM / (mpp * 2**level)
                    resolution = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
                tif.write(
                    _counted(ordered_map(pool, cut, tiles, LOOKAHEAD_TILES), bar),
                    shape=(h, w),
                    dtype=np.uint8,
                    tile=(TILE_PX, TILE_PX),
                    photometric="minisblack",
                    compression="lzw",
                    subfiletype=0 if level == 0 else 1,
                    metadata=None,
                    **resolution,
                )
    finally:
        bar.close()
        for source in sources[1:]:
            source.close()
    return path


def _tile_cutter(source: ChunkedMask, source_scale: int, level_scale: int, encoded: dict[int, bytes]):
    """cut(y, x, h, w) -> the LZW bytes of one output tile, pixels taken from `source` by nearest index.

    `source_scale` and `level_scale` are level-0 pixels per source pixel and per output pixel.
    """
    sh, sw = source.shape

    def index(start: int, count: int) -> np.ndarray:
        return (np.arange(start, start + count) * level_scale) // source_scale

    def cut(y: int, x: int, h: int, w: int) -> bytes:
        rows = np.minimum(index(y, h), sh - 1)
        cols = np.minimum(index(x, w), sw - 1)
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        if not source.any(r0, r1, c0, c1):
            return _uniform(encoded, 0)
        block = source.read(r0, r1, c0, c1)
        low, high = int(block.min()), int(block.max())
        if low == high and h == w == TILE_PX:
            return _uniform(encoded, low)
        tile = np.zeros((TILE_PX, TILE_PX), np.uint8)
        tile[:h, :w] = block[np.ix_(rows - r0, cols - c0)]
        return imagecodecs.lzw_encode(tile)

    return cut


def _uniform(encoded: dict[int, bytes], value: int) -> bytes:
    blob = encoded.get(value)
    if blob is None:
        blob = encoded[value] = imagecodecs.lzw_encode(np.full((TILE_PX, TILE_PX), value, np.uint8))
    return blob


def ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable[tuple], lookahead: int) -> Iterator:
    """fn(*item) for every item on the pool, yielded in order, at most `lookahead` in flight."""
    pending: deque = deque()
    todo = iter(items)
    try:
        for item in todo:
            pending.append(pool.submit(fn, *item))
            if len(pending) >= lookahead:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(fn, *nxt))
            yield result
    finally:
        for future in pending:
            future.cancel()


def _counted(items: Iterator, bar: tqdm) -> Iterator:
    for item in items:
        yield item
        bar.update(1)
