"""Tile outputs in, finished cells out: cropped or blended, smoothed, labelled and stored, off the network's thread.

`CellMerger` is the MONAI `Merger` that `PatchInferer` feeds; it only hands each tile output to the
slide's `Stitcher` through a bounded queue, so the network never waits for stitching. The stitcher's
thread turns tile outputs into cells:

- "crop" (the default): a tile's cell is its centre, the tile minus its margin, so every kept
  pixel saw `margin` pixels of context and no pixel is predicted twice;
- "constant" / "gaussian": overlapping tiles are averaged with MONAI's importance map, and a cell
  is finished once every tile over it has arrived.

Finished cells go to a pool of workers: 3 x 3 majority smoothing (two-class maps; the crop keeps a
one-pixel halo from the tile so cell borders are smoothed too), connected components for the
slide-wide cleanup, compression into the `ChunkedMask`.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from monai.data.utils import compute_importance_map
from monai.inferers import Merger

from custom.inference.chunks import ChunkedMask
from custom.inference.components import SlideComponents, label_cell, well_composed
from custom.inference.splitter import CellGrid

BLENDS = ("crop", "constant", "gaussian")
QUEUE_TILES = 4  # tile outputs waiting for the stitcher: bounds memory at a few tiles


def default_workers() -> int:
    """Cell workers: every core but the one the network's feeding thread mostly uses (at least 1)."""
    return max(1, (os.cpu_count() or 2) - 1)


class Stitcher:
    """Turns tile outputs of one slide into stored, labelled cells.

    Args:
        grid: the plan's `CellGrid`; cells: the (i, j) that will be inferred.
        store: where finished cells go (inference-level labels).
        components: the slide-wide union-find fed with every finished cell.
        blend: "crop", "constant" or "gaussian".
        smooth: 3 x 3 majority smoothing of two-class labels.
        probability: a `ChunkedMask` for 0..255 foreground probability, `probability_factor` times
            coarser than the inference level (None: not kept).
    """

    def __init__(
        self,
        grid: CellGrid,
        cells: Sequence[tuple[int, int]],
        store: ChunkedMask,
        components: SlideComponents,
        blend: str = "crop",
        smooth: bool = True,
        sigma_scale: float = 0.125,
        probability: ChunkedMask | None = None,
        probability_factor: int = 1,
        workers: int | None = None,
    ):
        if blend not in BLENDS:
            raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
        self.grid, self.store, self.components = grid, store, components
        self.blend, self.smooth = blend, smooth
        self.probability, self.probability_factor = probability, int(probability_factor)
        self.planned = set(cells)
        # tile origin -> the cells it decides: on a level under two strides long, two cells share one shifted tile
        self._cells_at: dict[tuple[int, int], list] = defaultdict(list)
        for cell in cells:
            self._cells_at[grid.tile_origin(*cell)].append(cell)
        self.weights = None
        if blend != "crop":
            self.weights = compute_importance_map(grid.tile_size, mode=blend, sigma_scale=sigma_scale).numpy()
            self.pending = {c: 0 for c in cells}
            for i, j in cells:
                for cell in self._cells_under(i, j):
                    self.pending[cell] += 1
            self.accumulators: dict[tuple[int, int], np.ndarray] = {}
        self.tiles = 0
        self.busy_s = 0.0
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_TILES)
        self._error: BaseException | None = None
        self._pool = ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="cell-worker")
        self._inflight = threading.BoundedSemaphore(2 * (workers or default_workers()) + 2)
        self._futures: list = []
        self._thread = threading.Thread(target=self._drain, name="stitcher", daemon=True)
        self._thread.start()

    # ---- producer side (the network's thread) ------------------------------------------------

    def submit(self, values: torch.Tensor, location: Sequence[int]) -> None:
        """Queue one tile output, (1, C, h, w) probabilities or (1, 1, h, w) integer labels, for every
        planned cell the tile at `location` decides."""
        self._raise()
        origin = (int(location[0]), int(location[1]))
        cells = self._cells_at.pop(origin, None)
        if not cells:
            raise ValueError(f"no planned tile starts at {origin}, or it came twice")
        values = values.detach().cpu().numpy()[0]
        for cell in cells:
            self._queue.put((values, cell))

    def finish(self) -> dict:
        """Wait for every cell to be stored; flush blended cells whose tiles never came."""
        self._queue.put(None)
        self._thread.join()
        self._raise()
        for f in self._futures:
            f.result()
        self._pool.shutdown()
        self._raise()
        return {"tiles": self.tiles, "stitch_busy_s": self.busy_s}

    def abort(self) -> None:
        if self._thread.is_alive():
            self._error = self._error or RuntimeError("aborted")
            self._queue.put(None)
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- the stitcher's thread ---------------------------------------------------------------

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                break
            if self._error is not None:
                continue  # keep draining so the producer never blocks; the error is raised there
            try:
                start = time.perf_counter()
                self._tile(*item)
                self.tiles += 1
                self.busy_s += time.perf_counter() - start
            except BaseException as err:
                self._error = err
        if self._error is None and self.weights is not None:
            try:
                for cell in list(self.accumulators):
                    self._emit_blended(cell)
            except BaseException as err:
                self._error = err

    def _tile(self, values: np.ndarray, cell: tuple[int, int]) -> None:
        if self.weights is None:
            self._crop(values, cell)
        else:
            self._accumulate(values, cell)

    def _crop(self, values: np.ndarray, cell: tuple[int, int]) -> None:
        i, j = cell
        y0, y1, x0, x1 = self.grid.cell_box(i, j)
        h, w = y1 - y0, x1 - x0
        oy, ox = self.grid.cell_offset(i, j)
        th, tw = values.shape[-2:]
        hy, hx = (min(1, m) for m in self.grid.margin)  # a one-pixel halo for the smoothing (overlap > 0)
        # the halo the tile has on each side: none where a tile shifted inside the slide ends at its edge
        top, bottom = min(hy, oy), min(hy, th - oy - h)
        left, right = min(hx, ox), min(hx, tw - ox - w)
        window = (slice(oy - top, oy + h + bottom), slice(ox - left, ox + w + right))
        pad = ((hy - top, hy - bottom), (hx - left, hx - right))
        probs = None
        if values.shape[0] == 1:
            labels = values[0][window].astype(np.uint8)
        else:
            probs = values[(slice(None), *window)]
            labels = channel_argmax(probs)
        if any(any(p) for p in pad):
            labels = np.pad(labels, pad, mode="edge")
            probs = None if probs is None else np.pad(probs, ((0, 0), *pad), mode="edge")
        # past the slide's edge the halo saw glass padding: smooth the edge as if the slide went on
        H, W = self.grid.shape
        if hy and y0 == 0:
            labels[0] = labels[1]
        if hy and y1 == H:
            labels[-1] = labels[-2]
        if hx and x0 == 0:
            labels[:, 0] = labels[:, 1]
        if hx and x1 == W:
            labels[:, -1] = labels[:, -2]
        self._hand_over(cell, labels, probs, (hy, hx))

    def _accumulate(self, values: np.ndarray, tile: tuple[int, int]) -> None:
        ty, tx = self.grid.tile_origin(*tile)
        th, tw = self.grid.tile_size
        for cell in self._cells_under(*tile):
            y0, y1, x0, x1 = self.grid.cell_box(*cell)
            acc = self.accumulators.get(cell)
            if acc is None:
                acc = self.accumulators[cell] = np.zeros((values.shape[0] + 1, y1 - y0, x1 - x0), np.float32)
            oy0, oy1 = max(y0, ty), min(y1, ty + th)
            ox0, ox1 = max(x0, tx), min(x1, tx + tw)
            wts = self.weights[oy0 - ty : oy1 - ty, ox0 - tx : ox1 - tx]
            region = (slice(oy0 - y0, oy1 - y0), slice(ox0 - x0, ox1 - x0))
            acc[(slice(None, -1), *region)] += values[:, oy0 - ty : oy1 - ty, ox0 - tx : ox1 - tx] * wts
            acc[(-1, *region)] += wts
            self.pending[cell] -= 1
            if self.pending[cell] == 0:
                self._emit_blended(cell)

    def _emit_blended(self, cell) -> None:
        acc = self.accumulators.pop(cell)
        weight = acc[-1]
        probs = np.divide(acc[:-1], weight, out=np.zeros_like(acc[:-1]), where=weight > 0)
        labels = channel_argmax(probs) if probs.shape[0] > 1 else (probs[0] > 0.5).astype(np.uint8)
        self._hand_over(cell, labels, probs, (0, 0))

    def _cells_under(self, i: int, j: int):
        """Planned cells that tile (i, j) overlaps."""
        ty, tx = self.grid.tile_origin(i, j)
        th, tw = self.grid.tile_size
        sy, sx = self.grid.stride
        for ci in range(max(0, ty // sy), min(self.grid.rows, -(-(ty + th) // sy))):
            for cj in range(max(0, tx // sx), min(self.grid.cols, -(-(tx + tw) // sx))):
                if (ci, cj) in self.planned:
                    yield ci, cj

    def _hand_over(self, cell, labels: np.ndarray, probs: np.ndarray | None, halo: tuple[int, int]) -> None:
        self._inflight.acquire()
        try:
            future = self._pool.submit(self._finish_cell, cell, labels, probs, halo)
        except BaseException:
            self._inflight.release()
            raise
        future.add_done_callback(lambda _: self._inflight.release())
        self._futures = [f for f in self._futures if not f.done()] + [future]

    # ---- cell workers ------------------------------------------------------------------------

    def _finish_cell(self, cell, labels: np.ndarray, probs: np.ndarray | None, halo: tuple[int, int]) -> None:
        try:
            hy, hx = halo
            if self.smooth and (probs is None or probs.shape[0] == 2) and min(labels.shape) > 2:
                labels = majority3(labels)  # the outer ring, whose neighbours lie elsewhere, is kept
                # corner-only junctions bridged: OpenCV's contours (the KPIs F1) and QuPath then see
                # the 8-connected objects the cleanup counts, not a spur per diagonal step
                if labels.max() <= 1:  # two classes (a device argmax can hand over more)
                    labels = well_composed(labels).view(np.uint8)
            labels = labels[hy : labels.shape[0] - hy, hx : labels.shape[1] - hx]
            y0, _, x0, _ = self.grid.cell_box(*cell)
            local, _, _ = label_cell(labels)
            self.store.put(*cell, labels)
            self.components.add(*cell, (y0, x0), local)
            if self.probability is not None and probs is not None:
                fg = 1.0 - probs[0, hy : probs.shape[1] - hy, hx : probs.shape[2] - hx]
                pooled = mean_pool(fg, self.probability_factor)
                self.probability.put(*cell, np.round(pooled * 255).astype(np.uint8))
        except BaseException as err:
            self._error = self._error or err
            raise

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError("stitching the slide's mask failed") from self._error


class CellMerger(Merger):
    """MONAI `Merger` that hands every tile output to a `Stitcher` (PatchInferer calls it per tile)."""

    def __init__(self, merged_shape, cropped_shape=None, device=None, *, stitcher: Stitcher):
        super().__init__(merged_shape, cropped_shape, device)
        self.stitcher = stitcher

    def aggregate(self, values: torch.Tensor, location: Sequence[int]) -> None:
        if self.is_finalized:
            raise ValueError("`CellMerger` is already finalized; start a new one for the next slide")
        self.stitcher.submit(values, location)

    def finalize(self) -> dict:
        self.is_finalized = True
        return self.stitcher.finish()


def channel_argmax(probs: np.ndarray) -> np.ndarray:
    """argmax over axis 0 of a (C, h, w) array, as uint8, first class winning ties.

    One pass per class over contiguous planes; numpy's strided argmax(axis=0) is ~10x slower.
    """
    labels = np.zeros(probs.shape[1:], np.uint8)
    best = probs[0].copy()
    for c in range(1, probs.shape[0]):
        wins = probs[c] > best
        labels[wins] = c
        np.maximum(best, probs[c], out=best)
    return labels


def majority3(labels: np.ndarray) -> np.ndarray:
    """3 x 3 majority of a 0/1 map inside its outer one-pixel ring (OpenCV's median, ~30x scipy's)."""
    out = labels.copy()
    out[1:-1, 1:-1] = cv2.medianBlur(np.ascontiguousarray(labels, np.uint8), 3)[1:-1, 1:-1]
    return out


def mean_pool(values: np.ndarray, k: int) -> np.ndarray:
    """k x k mean of a 2-D array; partial edge blocks average only their real pixels."""
    if k == 1:
        return values
    h, w = values.shape
    ph, pw = -(-h // k) * k, -(-w // k) * k
    padded = np.zeros((ph, pw), np.float32)
    padded[:h, :w] = values
    counts = np.zeros((ph, pw), np.float32)
    counts[:h, :w] = 1
    sums = padded.reshape(ph // k, k, pw // k, k).sum(axis=(1, 3))
    return sums / counts.reshape(ph // k, k, pw // k, k).sum(axis=(1, 3))
