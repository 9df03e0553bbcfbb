"""Drawing primitives shared by the tubule and glomerulus painters: pixel coordinates of a level,
anti-aliased steps, a coarse sampling grid, jittered point sets and elliptical splats.

Everything works on stain concentration layers (float32 PAS and haematoxylin), in level-0
geometry, for a region of one level; render.py turns the layers into RGB.
"""

from __future__ import annotations

import math

import numpy as np

from custom.synth.noise import cell_uniforms

# Smooth geometry (distance fields) is evaluated on a coarser grid, this many level-0 px apart but
# never closer than FIELD_STEP_MIN output px, and interpolated; edges stay sharp because they are
# thresholds applied to the interpolated distance at full resolution.
FIELD_STEP_LEVEL0_PX = 8
FIELD_STEP_MIN = 2
EDGE_SOFTNESS_UM = 0.4  # edges are at least this soft, as under a real objective
# Texture whose features span fewer output pixels than this is replaced by its mean.
MIN_FEATURE_PX = 2.0

# Stain concentrations per compartment (PAS magenta, haematoxylin blue-purple).
PAS_INTERSTITIUM = 0.13
PAS_MEMBRANE = 1.0
PAS_LUMEN = 0.03
H_NUCLEUS = (0.85, 1.25)
PAS_NUCLEUS = 0.15


def level_coords(level: int, y: int, x: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Level-0 coordinates of the pixel centres of a level-L region, and the downsample."""
    ds = 2**level
    return (x + np.arange(w) + 0.5) * ds, (y + np.arange(h) + 0.5) * ds, ds


def aa_step(d: np.ndarray, aa_px: float) -> np.ndarray:
    """Anti-aliased 0/1 step at d = 0 (d in level-0 px, positive side is 1), float32."""
    out = np.multiply(d, np.float32(1.0 / aa_px), dtype=np.float32)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


class CoarseGrid:
    """Samples every `step` level-L pixels, aligned to the level's pixel grid so tiles agree."""

    def __init__(self, level: int, y: int, x: int, h: int, w: int):
        ds = 2**level
        self.step = max(FIELD_STEP_MIN, FIELD_STEP_LEVEL0_PX // ds)
        self.first = ((y // self.step) * self.step, (x // self.step) * self.step)
        self.offset = (y - self.first[0], x - self.first[1])
        self.shape = (h, w)
        ny = (y + h - 1 - self.first[0]) // self.step + 2
        nx = (x + w - 1 - self.first[1]) // self.step + 2
        self.ys = (self.first[0] + np.arange(ny) * self.step + 0.5) * ds
        self.xs = (self.first[1] + np.arange(nx) * self.step + 0.5) * ds

    def upsample(self, coarse: np.ndarray) -> np.ndarray:
        """Bilinear (c, ny, nx) -> (c, h, w), by strided writes (the grid is aligned)."""
        step = self.step
        (oy, ox), (h, w) = self.offset, self.shape
        c, ny, nx = coarse.shape
        cols = np.empty((c, ny, (nx - 1) * step), np.float32)
        for s in range(step):
            t = np.float32(s / step)
            cols[:, :, s::step] = coarse[:, :, :-1] * (1 - t) + coarse[:, :, 1:] * t
        cols = cols[:, :, ox : ox + w]
        rows = np.empty((c, (ny - 1) * step, w), np.float32)
        for s in range(step):
            t = np.float32(s / step)
            rows[:, s::step] = cols[:, :-1] * (1 - t) + cols[:, 1:] * t
        return rows[:, oy : oy + h]


def jittered_points(xs, ys, spacing_px: float, pad_px: float, key: int, count: int):
    """One candidate point per cell of a jittered grid covering a region (plus pad_px): level-0
    centres and `count` uniforms each (the first two placed the point in its cell)."""
    cells_x = np.arange(
        math.floor((xs[0] - pad_px) / spacing_px), math.floor((xs[-1] + pad_px) / spacing_px) + 1
    )
    cells_y = np.arange(
        math.floor((ys[0] - pad_px) / spacing_px), math.floor((ys[-1] + pad_px) / spacing_px) + 1
    )
    u = cell_uniforms(cells_x[None, :], cells_y[:, None], key, count).reshape(-1, count)
    cx = (np.broadcast_to(cells_x[None, :], (len(cells_y), len(cells_x))).ravel() + u[:, 0]) * spacing_px
    cy = (np.broadcast_to(cells_y[:, None], (len(cells_y), len(cells_x))).ravel() + u[:, 1]) * spacing_px
    return cx, cy, u


def ellipse_cover(shape, cx, cy, r_major, r_minor, angle, xs, ys, ds):
    """Anti-aliased coverage of ellipses (level-0 geometry) on a region: flat pixel indices,
    coverage in (0, 1] and normalised radius d (0 at the centre, 1 on the outline)."""
    h, w = shape
    px, py = cx / ds - (xs[0] / ds - 0.5), cy / ds - (ys[0] / ds - 0.5)  # continuous region coords
    rmaj, rmin = r_major / ds, r_minor / ds
    k = math.ceil(2 * float(rmaj.max()) + 2)
    offs = np.arange(k)
    col = np.floor(px - k / 2).astype(np.int64)[:, None] + offs
    row = np.floor(py - k / 2).astype(np.int64)[:, None] + offs
    dx = (col + 0.5 - px[:, None])[:, None, :]
    dy = (row + 0.5 - py[:, None])[:, :, None]
    c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    d = np.sqrt(
        ((dx * c + dy * s) / rmaj[:, None, None]) ** 2 + ((dy * c - dx * s) / rmin[:, None, None]) ** 2
    )
    cover = np.clip((1 - d) * rmin[:, None, None] + 0.5, 0, 1)
    drawn = ((row >= 0) & (row < h))[:, :, None] & ((col >= 0) & (col < w))[:, None, :] & (cover > 0)
    flat = (row[:, :, None] * w + col[:, None, :])[drawn]
    return flat, cover, d, drawn


def max_into(layer: np.ndarray, flat: np.ndarray, values: np.ndarray) -> None:
    """layer.flat[flat] = max(layer.flat[flat], values), repeated indices included, in place."""
    buf = np.ascontiguousarray(layer)  # a window of a larger array is not contiguous
    np.maximum.at(buf.reshape(-1), flat, values.astype(np.float32))
    if buf is not layer:
        layer[...] = buf


def splat_nuclei(hx, pas, cx, cy, r_major, r_minor, angle, darkness, xs, ys, ds) -> None:
    """Draw elliptical nuclei (level-0 geometry) into the haematoxylin layer by maximum."""
    if len(cx) == 0:
        return
    flat, cover, d, drawn = ellipse_cover(hx.shape, cx, cy, r_major, r_minor, angle, xs, ys, ds)
    # Chromatin is a little denser in the middle of the nucleus.
    value = cover * darkness[:, None, None] * (0.85 + 0.15 * np.clip(1 - d * d, 0, 1))
    max_into(hx, flat, value[drawn])
    max_into(pas, flat, PAS_NUCLEUS * cover[drawn])
