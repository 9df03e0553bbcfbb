"""Fixed tile grids over a slide (the tile sampler's patch grid)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from custom.errors import ConfigError


def grid_locations(shape: Sequence[int], tile: Sequence[int], overlap: int = 0) -> list[tuple[int, int]]:
    """Top-left corners of a tile grid covering `shape` (the last row/column may stick out)."""
    sy, sx = tile[0] - overlap, tile[1] - overlap
    if sy <= 0 or sx <= 0:
        raise ConfigError(f"overlap {overlap} must be smaller than the tile {tuple(tile)}")
    ny = max(1, math.ceil((shape[0] - overlap) / sy))
    nx = max(1, math.ceil((shape[1] - overlap) / sx))
    return [(i * sy, j * sx) for i in range(ny) for j in range(nx)]
