"""Turn a stitched level-0 label store into a pyramidal label TIFF that viewers open.

Reduced levels are built one from the previous (2 x 2 max: an object stays visible when zoomed
out), block by block on disk, so memory never holds a level.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from custom.wsi.pyramid import pyramid_shapes, write_pyramid
from custom.wsi.stitch import STORE_COMPRESSOR

BLOCK_PX = 2048  # block of the finer level reduced at a time


def build_levels(level0: zarr.Array, work_dir: str | Path, min_side: int = 2000) -> list[zarr.Array]:
    """Level arrays for `pyramid_shapes` of level0, reduced levels stored under `work_dir`."""
    shapes = pyramid_shapes(*level0.shape, min_side=min_side)
    levels = [level0]
    for k, shape in enumerate(shapes[1:], start=1):
        finer = levels[-1]
        coarser = zarr.create_array(
            store=str(Path(work_dir) / f"level{k}.zarr"),
            shape=shape,
            chunks=(min(BLOCK_PX // 2, shape[0]), min(BLOCK_PX // 2, shape[1])),
            dtype=finer.dtype,
            fill_value=0,
            compressors=STORE_COMPRESSOR,
        )
        for y in range(0, finer.shape[0], BLOCK_PX):
            for x in range(0, finer.shape[1], BLOCK_PX):
                block = finer[y : y + BLOCK_PX, x : x + BLOCK_PX]
                if not block.any():
                    continue  # the store's fill value is already 0
                reduced = _max_pool2(block)
                coarser[y // 2 : y // 2 + reduced.shape[0], x // 2 : x // 2 + reduced.shape[1]] = reduced
        levels.append(coarser)
    return levels


def write_label_tiff(
    levels: list[zarr.Array], path: str | Path, mpp: float | None, progress: bool | str = False
) -> Path:
    """Write the level arrays as a 1-channel LZW pyramid (cuCIM, OpenSlide and tifffile read it)."""
    shapes = [tuple(a.shape) for a in levels]

    def tile_source(level, y, x, h, w):
        return levels[level][y : y + h, x : x + w]

    return write_pyramid(path, shapes, tile_source, channels=1, mpp=mpp, compression="lzw", progress=progress)


def coarsest_level_within(levels: list[zarr.Array], max_side_px: int) -> int:
    """The finest level whose long side is at most `max_side_px` (the coarsest if none is)."""
    for k, level in enumerate(levels):
        if max(level.shape) <= max_side_px:
            return k
    return len(levels) - 1


def _max_pool2(block: np.ndarray) -> np.ndarray:
    h, w = block.shape
    padded = np.zeros((h + h % 2, w + w % 2), block.dtype)
    padded[:h, :w] = block
    return padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).max(axis=(1, 3))
