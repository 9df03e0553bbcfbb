"""Fixed tile grids over a slide and the level a reader picks: shared by the tile sampler and inference."""

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


def resolve_level(slide, level: int | None = None, mpp: float | None = None) -> int:
    """The slide level to read: by mpp when given (needs a slide with a known mpp), else `level` (default 0)."""
    if mpp is not None:
        return slide.level_for_mpp(mpp)
    level = 0 if level is None else int(level)
    if not 0 <= level < slide.level_count:
        raise ConfigError(
            f"{slide.path}: level {level} requested, the slide has levels 0..{slide.level_count - 1}"
        )
    return level
