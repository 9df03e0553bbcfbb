"""Stitch tile predictions into a whole-slide label mask with bounded memory.

`RegionMerger` is a MONAI `Merger`: `PatchInferer` feeds it tile outputs and it blends them
(constant or gaussian weights) chunk by chunk. A chunk is finalised the moment every tile over it
has arrived, handed to a `LabelStore`, and forgotten; memory holds only unfinished chunks, never
the slide. Why not MONAI's `ZarrAvgMerger`: it keeps a full-resolution float average of the whole
slide (~56 GB for 80k x 70k), leaves its temporary store behind for every slide, reuses one output
path, and returns NaN where no tile ran. Here background is 0 and temporary stores are removed.
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import zarr
from monai.data.utils import compute_importance_map
from monai.inferers import Merger
from zarr.codecs import BloscCodec

from custom.wsi.cleanup import channel_argmax, clean_labels

CHUNK_PX = 512  # merge granularity at the inference level; a finished chunk is written at once
STORE_CHUNK_PX = 1024  # level-0 chunk of the on-disk label store
STORE_COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


class LabelStore:
    """A level-0 uint8 label map on disk (zarr), written by a background thread.

    Chunks arrive at the inference level (`factor` = its downsample, `level_shape` its size) and
    are enlarged to level 0 by pixel repetition. Writes overlap with the next tiles' inference; `close()` waits for them
    and re-raises any write error. Optionally keeps a foreground-probability map (0..255) at
    `probability_factor` times coarser than the inference level.
    """

    def __init__(
        self,
        shape0: tuple[int, int],
        factor: int = 1,
        level_shape: tuple[int, int] | None = None,
        work_dir: str | Path | None = None,
        probability_factor: int | None = None,
        queue_chunks: int = 64,
    ):
        self.shape0 = tuple(int(s) for s in shape0)
        self.factor = int(factor)
        self.level_shape = (
            tuple(level_shape) if level_shape else tuple(-(-s // self.factor) for s in self.shape0)
        )
        self.dir = Path(tempfile.mkdtemp(prefix="holohisto_stitch_", dir=work_dir))
        chunk0 = max(STORE_CHUNK_PX, CHUNK_PX * self.factor)
        self.labels = zarr.create_array(
            store=str(self.dir / "labels.zarr"),
            shape=self.shape0,
            chunks=(chunk0, chunk0),
            dtype="uint8",
            fill_value=0,
            compressors=STORE_COMPRESSOR,
        )
        self.probability = None
        self.probability_factor = probability_factor
        if probability_factor:
            step = self.factor * probability_factor
            shape = tuple(-(-s // step) for s in self.shape0)
            self.probability = zarr.create_array(
                store=str(self.dir / "probability.zarr"),
                shape=shape,
                chunks=(STORE_CHUNK_PX, STORE_CHUNK_PX),
                dtype="uint8",
                fill_value=0,
                compressors=STORE_COMPRESSOR,
            )
        self._queue: queue.Queue = queue.Queue(maxsize=queue_chunks)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="label-store-writer", daemon=True)
        self._thread.start()

    def write(self, y: int, x: int, labels: np.ndarray, foreground: np.ndarray | None = None) -> None:
        """Queue a finished chunk whose top-left is (y, x) at the inference level."""
        if self._error is not None:
            raise RuntimeError("writing the stitched mask failed") from self._error
        self._queue.put((y, x, labels, foreground))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError("writing the stitched mask failed") from self._error

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # keep draining so producers never block; the error is raised on close()
            try:
                self._store(*item)
            except BaseException as err:  # re-raised in the producer thread by write()/close()
                self._error = err

    def _store(self, y, x, labels, foreground) -> None:
        f = self.factor
        y0, x0 = y * f, x * f
        h0 = min(labels.shape[0] * f, self.shape0[0] - y0)
        w0 = min(labels.shape[1] * f, self.shape0[1] - x0)
        if h0 <= 0 or w0 <= 0:
            return
        big = labels if f == 1 else np.repeat(np.repeat(labels, f, axis=0), f, axis=1)
        # A level's size is level 0's divided and rounded down, so level 0 may have a few rows or
        # columns past the last level pixel: the chunk on that edge covers them too.
        if y + labels.shape[0] >= self.level_shape[0]:
            h0 = self.shape0[0] - y0
        if x + labels.shape[1] >= self.level_shape[1]:
            w0 = self.shape0[1] - x0
        if h0 > big.shape[0] or w0 > big.shape[1]:
            big = np.pad(big, ((0, max(0, h0 - big.shape[0])), (0, max(0, w0 - big.shape[1]))), mode="edge")
        self.labels[y0 : y0 + h0, x0 : x0 + w0] = big[:h0, :w0]
        if self.probability is not None and foreground is not None:
            k = self.probability_factor
            if y % k or x % k:
                raise ValueError(f"chunk origin ({y}, {x}) is not aligned to the probability step {k}")
            pooled = _mean_pool(foreground, k)
            py, px = y // k, x // k
            ph = min(pooled.shape[0], self.probability.shape[0] - py)
            pw = min(pooled.shape[1], self.probability.shape[1] - px)
            self.probability[py : py + ph, px : px + pw] = np.round(pooled[:ph, :pw] * 255).astype(np.uint8)


class RegionMerger(Merger):
    """Blend tile outputs and finalise each chunk once all tiles covering it have been aggregated.

    Chunk boundaries sit half a chunk off the tile grid, so the seams where tiles meet lie inside
    chunks; each finished chunk then loses its specks and pinholes (components wholly inside the
    chunk, so the decision is exact), which catches the one-pixel artefacts networks leave at tile
    edges.

    Args:
        merged_shape, cropped_shape, device: as MONAI's `Merger` (PatchInferer fills them in).
        tile_locations: every tile's top-left (y, x) the splitter will yield, so the merger knows
            how many contributions each chunk waits for.
        tile_size: (h, w) of every tile, at the inference level.
        sink: a `LabelStore` (or anything with `write(y, x, labels, foreground)`).
        blend: "constant" or "gaussian" weights inside each tile.
        chunk_px: merge granularity; chunk origins are multiples of chunk_px // 2, which must be a
            multiple of the sink's probability step when that is kept.
        min_object_px, max_hole_px: cleanup thresholds in pixels at the inference level (0: off).
        smooth: 3 x 3 majority smoothing of two-class chunks (see `custom.wsi.cleanup.clean_labels`).
    """

    def __init__(
        self,
        merged_shape: Sequence[int],
        cropped_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        *,
        tile_locations: Sequence[Sequence[int]] = (),
        tile_size: Sequence[int] = (),
        sink=None,
        blend: str = "constant",
        sigma_scale: float = 0.125,
        chunk_px: int = CHUNK_PX,
        min_object_px: int = 0,
        max_hole_px: int = 0,
        smooth: bool = False,
    ):
        super().__init__(merged_shape, cropped_shape, device)
        if sink is None:
            raise ValueError("RegionMerger needs a sink (a LabelStore) to write finished chunks to")
        if len(tile_size) != 2:
            raise ValueError(f"tile_size must be (h, w), got {tile_size}")
        self.height, self.width = (int(s) for s in self.cropped_shape[-2:])
        self.tile_size = (int(tile_size[0]), int(tile_size[1]))
        self.min_object_px, self.max_hole_px = int(min_object_px), int(max_hole_px)
        self.smooth = smooth
        self.sink = sink
        self.weights = compute_importance_map(self.tile_size, mode=blend, sigma_scale=sigma_scale).numpy()
        self.row_edges = _chunk_edges(self.height, int(chunk_px))
        self.col_edges = _chunk_edges(self.width, int(chunk_px))
        self.pending = np.zeros((len(self.row_edges) - 1, len(self.col_edges) - 1), dtype=np.int32)
        for loc in tile_locations:
            (cy0, cy1), (cx0, cx1) = self._chunk_span(loc)
            self.pending[cy0:cy1, cx0:cx1] += 1
        self.accumulators: dict[tuple[int, int], np.ndarray] = {}
        self.tiles_seen = 0
        self.chunks_written = 0

    def aggregate(self, values: torch.Tensor, location: Sequence[int]) -> None:
        if self.is_finalized:
            raise ValueError("`RegionMerger` is already finalized; start a new one for the next slide")
        probs = values.detach().float().cpu().numpy()[0]  # (C, h, w)
        if probs.shape[1:] != self.tile_size:
            raise ValueError(
                f"tile output {probs.shape[1:]} differs from the planned tile size {self.tile_size}"
            )
        ty, tx = int(location[0]), int(location[1])
        (cy0, cy1), (cx0, cx1) = self._chunk_span((ty, tx))
        for cy in range(cy0, cy1):
            for cx in range(cx0, cx1):
                self._add(cy, cx, probs, ty, tx)
        self.tiles_seen += 1

    def finalize(self) -> dict:
        """Flush every chunk still open (a tile that never came leaves its share as background)."""
        if not self.is_finalized:
            for cy, cx in list(self.accumulators):
                self._emit(cy, cx)
            self.is_finalized = True
        return {"tiles": self.tiles_seen, "chunks": self.chunks_written}

    def _chunk_span(self, loc):
        y0, x0 = max(0, int(loc[0])), max(0, int(loc[1]))
        y1 = min(self.height, int(loc[0]) + self.tile_size[0])
        x1 = min(self.width, int(loc[1]) + self.tile_size[1])
        if y1 <= y0 or x1 <= x0:
            return (0, 0), (0, 0)
        rows = np.searchsorted(self.row_edges, [y0, y1 - 1], side="right") - 1
        cols = np.searchsorted(self.col_edges, [x0, x1 - 1], side="right") - 1
        return (int(rows[0]), int(rows[1]) + 1), (int(cols[0]), int(cols[1]) + 1)

    def _add(self, cy, cx, probs, ty, tx) -> None:
        y0, y1 = int(self.row_edges[cy]), int(self.row_edges[cy + 1])
        x0, x1 = int(self.col_edges[cx]), int(self.col_edges[cx + 1])
        acc = self.accumulators.get((cy, cx))
        if acc is None:
            acc = self.accumulators[(cy, cx)] = np.zeros((probs.shape[0] + 1, y1 - y0, x1 - x0), np.float32)
        # overlap of this tile with this chunk, in chunk and in tile coordinates
        oy0, ox0 = max(y0, ty), max(x0, tx)
        oy1 = min(y1, ty + self.tile_size[0])
        ox1 = min(x1, tx + self.tile_size[1])
        wts = self.weights[oy0 - ty : oy1 - ty, ox0 - tx : ox1 - tx]
        region = (slice(oy0 - y0, oy1 - y0), slice(ox0 - x0, ox1 - x0))
        acc[(slice(None, -1), *region)] += probs[:, oy0 - ty : oy1 - ty, ox0 - tx : ox1 - tx] * wts
        acc[(-1, *region)] += wts
        self.pending[cy, cx] -= 1
        if self.pending[cy, cx] == 0:
            self._emit(cy, cx)

    def _emit(self, cy, cx) -> None:
        acc = self.accumulators.pop((cy, cx))
        weight = acc[-1]
        covered = weight > 0
        probs = np.divide(acc[:-1], weight, out=np.zeros_like(acc[:-1]), where=covered)
        labels = np.where(covered, channel_argmax(probs), 0).astype(np.uint8)
        y0, y1, x0, x1 = (
            self.row_edges[cy],
            self.row_edges[cy + 1],
            self.col_edges[cx],
            self.col_edges[cx + 1],
        )
        open_sides = (y0 > 0, y1 < self.height, x0 > 0, x1 < self.width)
        labels = clean_labels(labels, probs, self.min_object_px, self.max_hole_px, self.smooth, open_sides)
        foreground = np.where(covered, 1.0 - probs[0], 0.0) if probs.shape[0] > 1 else probs[0]
        self.sink.write(int(self.row_edges[cy]), int(self.col_edges[cx]), labels, foreground)
        self.chunks_written += 1


def _chunk_edges(length: int, chunk: int) -> np.ndarray:
    """Chunk boundaries along one axis: 0, chunk/2, chunk/2 + chunk, ..., length (half a chunk off the tiles)."""
    offset = chunk // 2
    inner = np.arange(offset, length, chunk) if offset else np.arange(chunk, length, chunk)
    return np.concatenate([[0], inner[inner > 0], [length]])


def _mean_pool(values: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return values
    h, w = values.shape
    ph, pw = -(-h // k) * k, -(-w // k) * k
    padded = np.zeros((ph, pw), values.dtype)
    padded[:h, :w] = values
    counts = np.zeros((ph, pw), np.float32)
    counts[:h, :w] = 1
    sums = padded.reshape(ph // k, k, pw // k, k).sum(axis=(1, 3))
    return sums / counts.reshape(ph // k, k, pw // k, k).sum(axis=(1, 3))
