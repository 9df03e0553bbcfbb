"""A 2-D uint8 label image held as compressed chunks in a spill file: the stitched mask, never whole.

Chunk (i, j) covers rows [i*c, (i+1)*c) and columns [j*c, (j+1)*c); a chunk never written is all
background and costs nothing. Chunks are LZ4-compressed (~1 GB/s each way) and appended to a
temporary file (unlinked at once), so memory holds only the index and a few decoded chunks, whatever the slide size.
Why not zarr: its per-call overhead dominates at one read per output tile, and it needs a
directory tree per slide; this is one file, removed with the store.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from numcodecs import LZ4

CODEC = LZ4(acceleration=1)
MIN_CACHED_CHUNKS = 32  # decoded chunks kept; at least one row of chunks, so a raster pass decodes each once


class ChunkedMask:
    """A (height, width) uint8 image in `chunk` x `chunk` blocks, written once or rewritten whole."""

    def __init__(self, shape, chunk, work_dir: str | Path | None = None, name: str = "mask"):
        self.shape = (int(shape[0]), int(shape[1]))
        self.chunk = (int(chunk[0]), int(chunk[1])) if np.ndim(chunk) else (int(chunk), int(chunk))
        self.grid = (-(-self.shape[0] // self.chunk[0]), -(-self.shape[1] // self.chunk[1]))
        fd, path = tempfile.mkstemp(prefix=f"holohisto_{name}_", suffix=".chunks", dir=work_dir)
        os.unlink(path)  # the open descriptor keeps the data; nothing is left behind, even after a crash
        self._fd = fd
        self._end = 0
        self._index: dict[tuple[int, int], tuple[int, int, tuple[int, int, int, int]]] = {}
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_chunks = max(MIN_CACHED_CHUNKS, self.grid[1] + 2)

    # ---- geometry ----------------------------------------------------------------------------

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """(y0, y1, x0, x1) of chunk (i, j), clipped to the image."""
        ch, cw = self.chunk
        return i * ch, min(self.shape[0], (i + 1) * ch), j * cw, min(self.shape[1], (j + 1) * cw)

    def chunk_shape(self, i: int, j: int) -> tuple[int, int]:
        y0, y1, x0, x1 = self.box(i, j)
        return y1 - y0, x1 - x0

    # ---- writing -----------------------------------------------------------------------------

    def put(self, i: int, j: int, values: np.ndarray) -> None:
        """Store chunk (i, j) (replacing any earlier version); an all-zero chunk is simply dropped."""
        values = np.ascontiguousarray(values, dtype=np.uint8)
        if values.shape != self.chunk_shape(i, j):
            raise ValueError(f"chunk ({i}, {j}) must be {self.chunk_shape(i, j)}, got {values.shape}")
        rows, cols = np.flatnonzero(values.any(axis=1)), np.flatnonzero(values.any(axis=0))
        with self._lock:
            self._cache.pop((i, j), None)
            if rows.size == 0:
                self._index.pop((i, j), None)
                return
            blob = CODEC.encode(values)
            offset = self._end
            os.pwrite(self._fd, blob, offset)
            self._end += len(blob)
            box = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
            self._index[(i, j)] = (offset, len(blob), box)

    # ---- reading -----------------------------------------------------------------------------

    def __contains__(self, ij) -> bool:
        return tuple(ij) in self._index

    def stored(self) -> Iterator[tuple[int, int]]:
        """Chunks holding any foreground, in raster order."""
        return iter(sorted(self._index))

    def nonzero_box(self, i: int, j: int) -> tuple[int, int, int, int] | None:
        """(y0, y1, x0, x1) inside chunk (i, j) bounding its non-zero pixels, None when it has none."""
        entry = self._index.get((i, j))
        return entry[2] if entry else None

    def get(self, i: int, j: int) -> np.ndarray | None:
        """Chunk (i, j) decoded (read-only, shared), or None when it holds only background."""
        with self._lock:
            entry = self._index.get((i, j))
            if entry is None:
                return None
            hit = self._cache.get((i, j))
            if hit is not None:
                self._cache.move_to_end((i, j))
                return hit
        offset, size, _ = entry
        values = np.frombuffer(CODEC.decode(os.pread(self._fd, size, offset)), np.uint8)
        values = values.reshape(self.chunk_shape(i, j))
        values.flags.writeable = False
        with self._lock:
            self._cache[(i, j)] = values
            while len(self._cache) > self._cache_chunks:
                self._cache.popitem(last=False)
        return values

    def any(self, y0: int, y1: int, x0: int, x1: int) -> bool:
        """Whether the region holds any foreground, from the chunks' bounding boxes (nothing is decoded)."""
        for i, j, (cy0, _cy1, cx0, _cx1) in self._overlapping(y0, y1, x0, x1):
            box = self.nonzero_box(i, j)
            if (
                box is not None
                and box[0] + cy0 < y1
                and box[1] + cy0 > y0
                and box[2] + cx0 < x1
                and box[3] + cx0 > x0
            ):
                return True
        return False

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0, y1) x [x0, x1), clipped to the image; background where nothing was stored."""
        y0, x0 = max(0, y0), max(0, x0)
        y1, x1 = min(self.shape[0], y1), min(self.shape[1], x1)
        out = np.zeros((max(0, y1 - y0), max(0, x1 - x0)), np.uint8)
        for i, j, (cy0, cy1, cx0, cx1) in self._overlapping(y0, y1, x0, x1):
            values = self.get(i, j)
            if values is None:
                continue
            ry0, ry1, rx0, rx1 = max(y0, cy0), min(y1, cy1), max(x0, cx0), min(x1, cx1)
            out[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = values[
                ry0 - cy0 : ry1 - cy0, rx0 - cx0 : rx1 - cx0
            ]
        return out

    def _overlapping(self, y0, y1, x0, x1):
        ch, cw = self.chunk
        for i in range(max(0, y0 // ch), min(self.grid[0], -(-y1 // ch))):
            for j in range(max(0, x0 // cw), min(self.grid[1], -(-x1 // cw))):
                yield i, j, self.box(i, j)

    # ---- derived levels and lifetime ---------------------------------------------------------

    def halved(self, work_dir: str | Path | None = None) -> ChunkedMask:
        """The next coarser level: 2 x 2 max (an object stays visible when zoomed out), same chunk size."""
        out = ChunkedMask((-(-self.shape[0] // 2), -(-self.shape[1] // 2)), self.chunk, work_dir, "level")
        _ch, _cw = self.chunk
        wanted = {(i // 2, j // 2) for i, j in self._index}
        for i, j in sorted(wanted):
            y0, y1, x0, x1 = out.box(i, j)
            block = self.read(2 * y0, 2 * y1, 2 * x0, 2 * x1)
            out.put(i, j, max_pool2(block)[: y1 - y0, : x1 - x0])
        return out

    def close(self) -> None:
        """Release the spill file (the store cannot be read afterwards)."""
        with self._lock:
            self._cache.clear()
            self._index.clear()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def max_pool2(block: np.ndarray) -> np.ndarray:
    """2 x 2 max of a 2-D array (odd edges padded with 0)."""
    h, w = block.shape
    if h % 2 or w % 2:
        padded = np.zeros((h + h % 2, w + w % 2), block.dtype)
        padded[:h, :w] = block
        block = padded
    # the four strided views' elementwise max: numpy's max over axes (1, 3) of a reshape is ~35x slower
    return np.maximum(
        np.maximum(block[0::2, 0::2], block[1::2, 0::2]), np.maximum(block[0::2, 1::2], block[1::2, 1::2])
    )
