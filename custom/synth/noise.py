"""Stateless, position-hashed randomness: the same coordinates give the same values in any tile.

Nothing here stores a per-slide array, so a texture costs the same memory on a 100k x 100k slide as
on a small one, and any tile at any level can be rendered alone. Coordinates are level-0 pixels.
"""

from __future__ import annotations

import functools

import numpy as np

_U64 = np.uint64
_MIX_X = _U64(0x9E3779B97F4A7C15)
_MIX_Y = _U64(0xC2B2AE3D27D4EB4F)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_TO_UNIT = 2.0**-53


@functools.lru_cache(maxsize=4096)
def stream_key(seed: int, name: str) -> int:
    """A 64-bit key for one named random stream of one slide (stable across runs and machines)."""
    key = _U64(seed & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        for ch in name.encode():
            key = _mix(key ^ (_U64(ch) + _U64(1)) * _MIX_Y)
    return int(key)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: every input bit affects every output bit."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> _U64(30))
        h = h * _M1
        h = h ^ (h >> _U64(27))
        h = h * _M2
        return h ^ (h >> _U64(31))


def hash_uniform(ix: np.ndarray, iy: np.ndarray, key: int) -> np.ndarray:
    """Uniform [0, 1) float64 for each integer lattice point (ix, iy), broadcast together."""
    with np.errstate(over="ignore"):
        h = (
            np.asarray(ix, dtype=np.int64).astype(_U64) * _MIX_X
            ^ np.asarray(iy, dtype=np.int64).astype(_U64) * _MIX_Y
            ^ _U64(key)
        )
    return (_mix(h) >> _U64(11)).astype(np.float64) * _TO_UNIT


def cell_uniforms(ix: np.ndarray, iy: np.ndarray, key: int, count: int) -> np.ndarray:
    """`count` independent uniforms per lattice cell, stacked on a new last axis."""
    return np.stack([hash_uniform(ix, iy, stream_key(key, f"u{i}")) for i in range(count)], axis=-1)


def _smooth(t: np.ndarray) -> np.ndarray:
    return t * t * (3.0 - 2.0 * t)


def _axis_weights(coords: np.ndarray, cell_px: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Lattice index (relative to the first one needed) and smooth weight along one axis."""
    scaled = np.asarray(coords, dtype=np.float64) / cell_px
    index = np.floor(scaled).astype(np.int64)
    first = int(index.min())
    return index - first, _smooth(scaled - index), first


def value_noise_grid(xs: np.ndarray, ys: np.ndarray, cell_px: float, key: int) -> np.ndarray:
    """Smooth value noise in [-1, 1] on the grid ys x xs (1-D coordinate arrays), float32.

    Separable: hashes only the few lattice points the grid spans, then interpolates rows and
    columns, so a 256 x 256 tile costs a few array passes whatever the cell size.
    """
    ix, tx, x0 = _axis_weights(xs, cell_px)
    iy, ty, y0 = _axis_weights(ys, cell_px)
    lattice_x = np.arange(x0, x0 + int(ix.max()) + 2)
    lattice_y = np.arange(y0, y0 + int(iy.max()) + 2)
    values = (hash_uniform(lattice_x[None, :], lattice_y[:, None], key) * 2.0 - 1.0).astype(np.float32)
    ty32, tx32 = ty.astype(np.float32)[:, None], tx.astype(np.float32)
    rows = values[iy] * (1 - ty32) + values[iy + 1] * ty32
    return rows[:, ix] * (1 - tx32) + rows[:, ix + 1] * tx32


def value_noise_points(x: np.ndarray, y: np.ndarray, cell_px: float, key: int) -> np.ndarray:
    """The same field as value_noise_grid, at scattered points (x, y broadcast together)."""
    x, y = np.broadcast_arrays(np.asarray(x, np.float64) / cell_px, np.asarray(y, np.float64) / cell_px)
    ix, iy = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    tx, ty = _smooth(x - ix), _smooth(y - iy)

    def corner(dx: int, dy: int) -> np.ndarray:
        return hash_uniform(ix + dx, iy + dy, key) * 2.0 - 1.0

    top = corner(0, 0) * (1 - tx) + corner(1, 0) * tx
    bottom = corner(0, 1) * (1 - tx) + corner(1, 1) * tx
    return (top * (1 - ty) + bottom * ty).astype(np.float32)


def fbm_grid(
    xs: np.ndarray, ys: np.ndarray, octaves: list[tuple[float, float]], key: int, min_cell_px: float
) -> np.ndarray:
    """Sum of value-noise octaves (cell_px, amplitude); octaves with cell < min_cell_px are left out.

    Leaving out the octaves a level cannot resolve is what keeps coarse levels from aliasing.
    """
    total = np.zeros((len(ys), len(xs)), np.float32)
    for i, (cell_px, amplitude) in enumerate(octaves):
        if cell_px >= min_cell_px:
            total += amplitude * value_noise_grid(xs, ys, cell_px, stream_key(key, f"octave{i}"))
    return total


def fbm_points(x: np.ndarray, y: np.ndarray, octaves: list[tuple[float, float]], key: int) -> np.ndarray:
    """All octaves of fbm_grid, at scattered points."""
    total = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)), np.float32)
    for i, (cell_px, amplitude) in enumerate(octaves):
        total += amplitude * value_noise_points(x, y, cell_px, stream_key(key, f"octave{i}"))
    return total
