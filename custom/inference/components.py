"""Slide-wide connected components of the stitched mask, found one cell at a time.

Each finished cell is labelled on its own (OpenCV): foreground 8-connected, as objects are counted;
background 4-connected, its dual, so that a background component enclosed by foreground is a hole
of exactly one object. Local components get global ids, and where two cells meet, the ids of
pixels that touch across the shared edge (or corner, for the foreground) are joined in a
union-find. Once every cell is in, each object's and each hole's *whole* size is known, however
many cells it spans, so the cleanup decides per object, never per cell. Only components that touch
their cell's edge enter the union-find: one wholly inside a cell is already whole, so it is judged
when its cell arrives, and only a kept object's box is held. On a speckled 80k x 80k slide that is
70,000 of 2.26 million components; at 66 bytes each (and a copy while the tables grew) all of them
were most of the ~200 MB by which peak memory grew from a 20k slide to it. Memory holds a few numbers
per edge component, the kept objects' boxes and the border pixels of cells whose neighbours have not
arrived yet; never a full-slide array.

Background that touches a cell that is never inferred (glass) is open: not a hole. Background that
touches only the slide's edge is a hole when small: enclosed by one object and the edge (two objects
that enclose it touch, so they are one), it is a notch where the tile's margin saw glass padding.

Not MONAI's `RemoveSmallObjects` / `FillHoles`: they judge one array, and an object here spans cells.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np

SIDES = ("top", "bottom", "left", "right")
# (di, dj) of a neighbour -> (my side, its side) for edge neighbours
EDGE_NEIGHBOURS = {
    (-1, 0): ("top", "bottom"),
    (1, 0): ("bottom", "top"),
    (0, -1): ("left", "right"),
    (0, 1): ("right", "left"),
}
# (di, dj) of a diagonal neighbour -> (my corner, its corner); corners index (row, col) in {0, -1}
CORNER_NEIGHBOURS = {
    (-1, -1): ((0, 0), (-1, -1)),
    (-1, 1): ((0, -1), (-1, 0)),
    (1, -1): ((-1, 0), (0, -1)),
    (1, 1): ((-1, -1), (0, 0)),
}


@dataclass
class LocalLabels:
    """What the union-find needs of one labelled cell (no full-size arrays).

    Components that touch the cell's edge are numbered 1..m apart from OpenCV's labels:
    `fg_edge_ids[k - 1]` is the OpenCV label of edge component k, and the edges hold those k.
    """

    fg_count: int  # foreground components 1..fg_count (OpenCV's labels)
    fg_area: np.ndarray
    fg_box: np.ndarray  # (n, 4) y0, x0, y1, x1 inside the cell
    fg_seed: np.ndarray  # (n, 2) y, x of one pixel of each component, inside the cell
    bg_count: int
    bg_area: np.ndarray
    fg_edges: dict  # side -> edge-component numbers along that side (0 = not foreground)
    bg_edges: dict
    fg_edge_ids: np.ndarray  # OpenCV labels of the foreground components on the edge, ascending
    bg_edge_ids: np.ndarray


def well_composed(mask: np.ndarray) -> np.ndarray:
    """`mask` with every 2 x 2 diagonal-only pattern bridged, so 4- and 8-connectivity agree."""
    out = mask.astype(bool).copy()
    for _ in range(64):  # a bridge can create a new pattern next to it; a few passes settle it
        a, b, c, d = out[:-1, :-1], out[:-1, 1:], out[1:, :-1], out[1:, 1:]
        main = a & d & ~b & ~c  # [1 0; 0 1]
        anti = b & c & ~a & ~d  # [0 1; 1 0]
        if not (main.any() or anti.any()):
            break
        out[:-1, 1:] |= main  # bridge through the top-right gap pixel
        out[:-1, :-1] |= anti  # and through the top-left one
    return out


def label_cell(labels: np.ndarray) -> tuple[LocalLabels, np.ndarray, np.ndarray]:
    """Label one cell: (summary, foreground labels, background labels), OpenCV's deterministic numbering."""
    if not labels.any():  # most cells: one background component, and no labelling to pay for
        return _empty_cell(labels.shape)
    fg = (labels > 0).view(np.uint8) if labels.dtype == np.bool_ else (labels > 0).astype(np.uint8)
    nf, lf, sf, _ = cv2.connectedComponentsWithStats(fg, connectivity=8, ltype=cv2.CV_32S)
    nb, lb, sb, _ = cv2.connectedComponentsWithStats(1 - fg, connectivity=4, ltype=cv2.CV_32S)
    x, y, w, h = (sf[1:, k] for k in range(4))
    seeds = np.zeros((nf - 1, 2), np.int64)
    for k in range(1, nf):  # a component's first pixel in raster order lies on its top row
        row = lf[y[k - 1], x[k - 1] : x[k - 1] + w[k - 1]]
        seeds[k - 1] = (y[k - 1], x[k - 1] + int(np.argmax(row == k)))
    fg_edges, fg_edge_ids = _edges(lf, nf)
    bg_edges, bg_edge_ids = _edges(lb, nb)
    summary = LocalLabels(
        fg_count=nf - 1,
        fg_area=sf[1:, cv2.CC_STAT_AREA].astype(np.int64),
        fg_box=np.stack([y, x, y + h, x + w], axis=1).astype(np.int64),
        fg_seed=seeds,
        bg_count=nb - 1,
        bg_area=sb[1:, cv2.CC_STAT_AREA].astype(np.int64),
        fg_edges=fg_edges,
        bg_edges=bg_edges,
        fg_edge_ids=fg_edge_ids,
        bg_edge_ids=bg_edge_ids,
    )
    return summary, lf, lb


def _empty_cell(shape) -> tuple[LocalLabels, np.ndarray, np.ndarray]:
    h, w = shape
    zeros, ones = np.broadcast_to(np.int32(0), shape), np.broadcast_to(np.int32(1), shape)  # no full arrays
    fg_edges, fg_edge_ids = _edges(zeros, 1)
    bg_edges, bg_edge_ids = _edges(ones, 2)
    summary = LocalLabels(
        fg_count=0,
        fg_area=np.zeros(0, np.int64),
        fg_box=np.zeros((0, 4), np.int64),
        fg_seed=np.zeros((0, 2), np.int64),
        bg_count=1,
        bg_area=np.array([h * w], np.int64),
        fg_edges=fg_edges,
        bg_edges=bg_edges,
        fg_edge_ids=fg_edge_ids,
        bg_edge_ids=bg_edge_ids,
    )
    return summary, zeros, ones


def _edges(lab: np.ndarray, count: int) -> tuple[dict, np.ndarray]:
    """The labels along each side renumbered 1..m over the components on the edge, and their OpenCV labels."""
    sides = {"top": lab[0], "bottom": lab[-1], "left": lab[:, 0], "right": lab[:, -1]}
    ids = np.unique(np.concatenate(list(sides.values())))
    ids = ids[ids > 0]
    number = np.zeros(count, np.int64)
    number[ids] = np.arange(1, ids.size + 1)
    return {side: number[values] for side, values in sides.items()}, ids.astype(np.int64)


@dataclass
class _Cell:
    origin: tuple[int, int]
    fg_base: int
    fg_count: int  # edge components only: the union-find's ids fg_base + 1 .. fg_base + fg_count
    bg_base: int
    bg_count: int
    fg_edges: dict | None
    bg_edges: dict | None
    waiting: int  # present neighbours not added yet; the edges are dropped when it reaches 0
    inside_changes: bool  # an object inside the cell is dropped, or a hole inside it filled


class SlideComponents:
    """Union-find over the components of every cell of a `CellGrid` plan.

    Args:
        present: the (i, j) cells that will be added; every other cell is background (glass).
        grid_shape: (rows, cols) of the cell grid.
        min_object_px: objects under this many pixels are dropped.
        max_hole_px: enclosed holes under this many pixels are filled.
    """

    def __init__(self, present, grid_shape: tuple[int, int], min_object_px: int = 0, max_hole_px: int = 0):
        self.present = set(present)
        self.rows, self.cols = grid_shape
        self.min_object_px, self.max_hole_px = int(min_object_px), int(max_hole_px)
        self.cells: dict[tuple[int, int], _Cell] = {}
        self._inside: list[tuple[np.ndarray, np.ndarray]] = []  # kept objects wholly inside a cell
        self._lock = threading.Lock()
        self._n = 0
        self._parent = np.zeros(1024, np.int64)
        self._area = np.zeros(1024, np.int64)
        self._open = np.zeros(1024, bool)
        self._is_fg = np.zeros(1024, bool)
        self._box = np.zeros((1024, 4), np.int64)  # slide coordinates at the inference level
        self._seed = np.zeros((1024, 2), np.int64)
        self._roots: np.ndarray | None = None

    @property
    def tracked(self) -> int:
        """Components in the union-find: those on a cell's edge."""
        return self._n

    # ---- pass 1 ------------------------------------------------------------------------------

    def add(self, i: int, j: int, origin: tuple[int, int], local: LocalLabels) -> None:
        """Add cell (i, j) whose top-left is `origin` (y, x) at the inference level."""
        with self._lock:
            self._roots = None
            oy, ox = origin
            fg_edge, bg_edge = local.fg_edge_ids - 1, local.bg_edge_ids - 1  # rows of the local tables
            fg_base = self._allocate(fg_edge.size, fg=True)
            ids = slice(fg_base + 1, fg_base + 1 + fg_edge.size)
            self._area[ids] = local.fg_area[fg_edge]
            self._box[ids] = local.fg_box[fg_edge] + np.array([oy, ox, oy, ox])
            self._seed[ids] = local.fg_seed[fg_edge] + np.array([oy, ox])
            bg_base = self._allocate(bg_edge.size, fg=False)
            self._area[bg_base + 1 : bg_base + 1 + bg_edge.size] = local.bg_area[bg_edge]
            inside_fg = np.ones(local.fg_count, bool)
            inside_fg[fg_edge] = False
            inside_bg = np.ones(local.bg_count, bool)
            inside_bg[bg_edge] = False
            small, pinhole = self._judged_whole(local)
            dropped, filled = inside_fg & small, inside_bg & pinhole
            kept = inside_fg & ~dropped
            if kept.any():
                self._inside.append(
                    (
                        local.fg_box[kept] + np.array([oy, ox, oy, ox]),
                        local.fg_seed[kept] + np.array([oy, ox]),
                    )
                )
            fg_edges = {s: _globalise(e, fg_base) for s, e in local.fg_edges.items()}
            bg_edges = {s: _globalise(e, bg_base) for s, e in local.bg_edges.items()}
            waiting = 0
            for (di, dj), (mine, theirs) in EDGE_NEIGHBOURS.items():
                other = (i + di, j + dj)
                if other not in self.present:
                    if 0 <= other[0] < self.rows and 0 <= other[1] < self.cols:  # glass, not the slide edge
                        self._open[bg_edges[mine][bg_edges[mine] > 0]] = True
                elif other in self.cells:
                    cell = self.cells[other]
                    self._join_edge(fg_edges[mine], cell.fg_edges[theirs], diagonal=True)
                    self._join_edge(bg_edges[mine], cell.bg_edges[theirs], diagonal=False)
                    self._release(other)
                else:
                    waiting += 1
            for (di, dj), (mine, theirs) in CORNER_NEIGHBOURS.items():
                other = (i + di, j + dj)
                if other in self.cells:
                    a = _corner(fg_edges, mine)
                    b = _corner(self.cells[other].fg_edges, theirs)
                    if a and b:
                        self._union(a, b)
                    self._release(other)
                elif other in self.present:
                    waiting += 1
            self.cells[(i, j)] = _Cell(
                (oy, ox),
                fg_base,
                fg_edge.size,
                bg_base,
                bg_edge.size,
                fg_edges,
                bg_edges,
                waiting,
                bool(dropped.any() or filled.any()),
            )
            if waiting == 0:
                self.cells[(i, j)].fg_edges = self.cells[(i, j)].bg_edges = None

    # ---- decisions ---------------------------------------------------------------------------

    def roots(self) -> np.ndarray:
        if self._roots is None:
            parent = self._parent[: self._n + 1].copy()
            while True:  # pointer jumping: every id straight to its root
                nxt = parent[parent]
                if np.array_equal(nxt, parent):
                    break
                parent = nxt
            self._roots = parent
        return self._roots

    def decide(self) -> tuple[np.ndarray, np.ndarray]:
        """Per global id: (drop, fill) - objects under `min_object_px`, enclosed holes under `max_hole_px`."""
        roots = self.roots()
        area = self._area[: self._n + 1][roots]
        is_fg = self._is_fg[: self._n + 1]
        opened = self._open[: self._n + 1][roots]
        drop = is_fg & (area < self.min_object_px)
        fill = ~is_fg & ~opened & (area < self.max_hole_px)
        drop[0] = fill[0] = False
        return drop, fill

    def changed(self, i: int, j: int, drop: np.ndarray, fill: np.ndarray) -> bool:
        """Whether the cleanup changes anything in cell (i, j) (so it need not be read back otherwise)."""
        cell = self.cells.get((i, j))
        if cell is None:
            return False
        return bool(
            cell.inside_changes
            or drop[cell.fg_base + 1 : cell.fg_base + 1 + cell.fg_count].any()
            or fill[cell.bg_base + 1 : cell.bg_base + 1 + cell.bg_count].any()
        )

    def changes(
        self, i: int, j: int, local: LocalLabels, drop: np.ndarray, fill: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(drop, fill) lookup tables over the OpenCV labels of cell (i, j), `local` its labelling again."""
        cell = self.cells[(i, j)]
        if local.fg_edge_ids.size != cell.fg_count or local.bg_edge_ids.size != cell.bg_count:
            raise ValueError(f"cell ({i}, {j}) was labelled differently when it was added")
        local_drop = np.zeros(local.fg_count + 1, bool)
        local_fill = np.zeros(local.bg_count + 1, bool)
        local_drop[1:], local_fill[1:] = self._judged_whole(local)  # right for the interior ones
        local_drop[local.fg_edge_ids] = drop[cell.fg_base + 1 : cell.fg_base + 1 + cell.fg_count]
        local_fill[local.bg_edge_ids] = fill[cell.bg_base + 1 : cell.bg_base + 1 + cell.bg_count]
        return local_drop, local_fill

    def _judged_whole(self, local: LocalLabels) -> tuple[np.ndarray, np.ndarray]:
        """Per OpenCV label 1..n of a cell: (drop, fill) if each component were all there is of it."""
        return local.fg_area < self.min_object_px, local.bg_area < self.max_hole_px

    def objects(self, drop: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(box y0, x0, y1, x1; seed y, x) of every kept object, in the order of their first pixel."""
        found = [(box, seed) for boxes, seeds in self._inside for box, seed in zip(boxes, seeds, strict=True)]
        ids = np.flatnonzero(self._is_fg[: self._n + 1] & ~drop)
        if ids.size:
            r = self.roots()[ids]
            order = np.argsort(r, kind="stable")
            ids, r = ids[order], r[order]
            starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
            boxes = self._box[ids]
            y0 = np.minimum.reduceat(boxes[:, 0], starts)
            x0 = np.minimum.reduceat(boxes[:, 1], starts)
            y1 = np.maximum.reduceat(boxes[:, 2], starts)
            x1 = np.maximum.reduceat(boxes[:, 3], starts)
            seeds = self._seed[ids[starts]]
            found += [
                (np.array([a, b, c, d]), s) for a, b, c, d, s in zip(y0, x0, y1, x1, seeds, strict=True)
            ]
        found.sort(key=lambda o: (int(o[1][0]), int(o[1][1])))
        return found

    # ---- internals ---------------------------------------------------------------------------

    def _allocate(self, count: int, fg: bool) -> int:
        base = self._n
        need = base + count + 1
        if need > self._parent.size:
            size = max(need, 2 * self._parent.size)
            self._parent = _grow(self._parent, size)
            self._area, self._open, self._is_fg = (
                _grow(a, size) for a in (self._area, self._open, self._is_fg)
            )
            self._box, self._seed = _grow(self._box, size), _grow(self._seed, size)
        new = np.arange(base + 1, base + count + 1)
        self._parent[new] = new
        self._is_fg[new] = fg
        self._n += count
        return base

    def _join_edge(self, a: np.ndarray, b: np.ndarray, diagonal: bool) -> None:
        """Join ids facing each other across an edge (and diagonally along it for the foreground)."""
        pairs = [(a, b)]
        if diagonal:
            pairs += [(a[:-1], b[1:]), (a[1:], b[:-1])]
        found = []
        for p, q in pairs:
            both = (p > 0) & (q > 0)
            if both.any():
                found.append(p[both] * (self._n + 1) + q[both])
        if not found:
            return
        for code in np.unique(np.concatenate(found)):
            self._union(int(code // (self._n + 1)), int(code % (self._n + 1)))

    def _find(self, a: int) -> int:
        parent = self._parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return int(root)

    def _union(self, a: int, b: int) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self._parent[rb] = ra
        self._area[ra] += self._area[rb]
        self._open[ra] |= self._open[rb]
        self._box[ra, :2] = np.minimum(self._box[ra, :2], self._box[rb, :2])
        self._box[ra, 2:] = np.maximum(self._box[ra, 2:], self._box[rb, 2:])

    def _release(self, ij) -> None:
        cell = self.cells[ij]
        cell.waiting -= 1
        if cell.waiting <= 0:
            cell.fg_edges = cell.bg_edges = None


def _globalise(local: np.ndarray, base: int) -> np.ndarray:
    out = local.astype(np.int64)
    out[out > 0] += base
    return out


def _corner(edges: dict, corner: tuple[int, int]) -> int:
    row, col = corner
    return int(edges["top" if row == 0 else "bottom"][col])


def _grow(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, *a.shape[1:]), a.dtype)
    out[: a.shape[0]] = a
    return out


def apply_changes(
    labels: np.ndarray, lf: np.ndarray, lb: np.ndarray, drop: np.ndarray, fill: np.ndarray, max_hole_px: int
) -> np.ndarray:
    """Cell labels with dropped objects set to 0 and filled holes set to their object's class.

    A speck inside a filled hole would leave a speck-sized pinhole behind: pockets that then lie
    wholly inside the cell and are under `max_hole_px` are filled too (exact, being interior).
    """
    out = labels.copy()
    dropped = drop[lf]
    out[dropped] = 0
    holes = fill[lb]
    if holes.any() and dropped.any():
        # a dropped object's own holes go with it (filled, they were left behind as specks)
        holes &= ~_enclosed(dropped)
    if holes.any():
        out[holes] = _enclosing_class(out, holes)
    if max_hole_px > 0:
        pocket = _interior_small(out == 0, max_hole_px)
        if pocket.any():
            out[pocket] = _enclosing_class(out, pocket)
    return out


def _enclosed(barrier: np.ndarray) -> np.ndarray:
    """Pixels that `barrier` alone encloses within the cell (4-connected, off the cell's edge)."""
    return _interior_small(~barrier, barrier.size + 1)


def _interior_small(binary: np.ndarray, max_px: int) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(binary.astype(np.uint8), connectivity=4)
    if n <= 1:
        return np.zeros(binary.shape, bool)
    x, y, w, h, area = (stats[:, k] for k in range(5))
    inside = (x > 0) & (y > 0) & (x + w < binary.shape[1]) & (y + h < binary.shape[0]) & (area < max_px)
    inside[0] = False
    return inside[lab]


def _enclosing_class(labels: np.ndarray, holes: np.ndarray) -> int:
    """The foreground class that borders `holes` most (1 for two-class maps)."""
    if labels.max() <= 1:
        return 1
    ring = cv2.dilate(holes.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & (labels > 0)
    counts = np.bincount(labels[ring], minlength=2)
    return int(np.argmax(counts[1:]) + 1) if counts[1:].any() else 1
