"""Fixed tile grids over a slide, and the inference splitter that reads only the tiles on tissue.

`TissueTileSplitter` replaces MONAI's `WSISlidingWindowSplitter` for whole slides. Why: that
splitter reads every tile of the grid and filters afterwards (so time grows with slide area, not
tissue area) and reopens the slide on every call. This one plans the grid, keeps the tiles that
touch tissue, and reads them ahead on worker threads while the network runs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.inferers import Splitter
from monai.utils import ensure_tuple_rep
from tqdm.auto import tqdm

from custom.data.tissue import TissueCache, TissueMask
from custom.errors import ConfigError
from custom.wsi.reader import open_slide


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


@dataclass
class TilePlan:
    """Which tiles of one slide are inferred, at which level."""

    slide: object
    level: int
    shape: tuple[int, int]  # (h, w) of the level
    downsample: float
    tile_size: tuple[int, int]
    tissue: TissueMask
    locations: list[tuple[int, int]] = field(default_factory=list)  # (y, x) top-left at the level
    grid_tiles: int = 0  # tiles the full grid would have had

    @property
    def tissue_tiles(self) -> int:
        return len(self.locations)


class TissueTileSplitter(Splitter):
    """Split a slide (given by path) into tiles at a level, keeping those that touch tissue.

    Yields (patch, location): patch is a (1, 3, h, w) uint8 tensor, location (y, x) at the level.
    Tiles sticking out of the slide are padded with white glass.
    """

    def __init__(
        self,
        patch_size: int | Sequence[int] = 4096,
        overlap: int = 0,
        level: int | None = None,
        mpp: float | None = None,
        tissue: TissueCache | dict | None = None,
        min_tissue_fraction: float = 0.0,
        read_ahead: int = 2,
        progress: bool = True,
        device: torch.device | str | None = None,
    ):
        size = tuple(int(s) for s in ensure_tuple_rep(patch_size, 2))
        super().__init__(patch_size=size, device=device)
        self.overlap = int(overlap)
        self.level, self.mpp = level, mpp
        self.tissue = tissue if isinstance(tissue, TissueCache) else TissueCache(**(tissue or {}))
        self.min_tissue_fraction = float(min_tissue_fraction)
        self.read_ahead = max(1, int(read_ahead))
        self.progress = progress
        self._plan: TilePlan | None = None

    def plan(self, path) -> TilePlan:
        """Open the slide, find its tissue and list the tiles to infer (cached for the same path)."""
        path = str(path)
        if self._plan is not None and self._plan.slide.path == path:
            return self._plan
        slide = open_slide(path)
        level = resolve_level(slide, self.level, self.mpp)
        tissue = self.tissue.get(slide)
        shape = tuple(slide.level_shapes[level])
        ds = float(slide.downsamples[level])
        size0 = (round(self.patch_size[0] * ds), round(self.patch_size[1] * ds))
        grid = grid_locations(shape, self.patch_size, self.overlap)
        keep = []
        for y, x in grid:
            loc0 = (round(y * ds), round(x * ds))
            if self.min_tissue_fraction > 0:
                if tissue.box_fraction(loc0, size0) >= self.min_tissue_fraction:
                    keep.append((y, x))
            elif tissue.touches(loc0, size0):
                keep.append((y, x))
        self._plan = TilePlan(slide, level, shape, ds, self.patch_size, tissue, keep, len(grid))
        return self._plan

    def get_input_shape(self, inputs) -> tuple:
        return self.plan(inputs).shape

    def get_padded_shape(self, inputs) -> tuple:
        return self.plan(inputs).shape  # the merger clips tiles that stick out; nothing is padded

    def __call__(self, inputs):
        plan = self.plan(inputs)
        slide, ds = plan.slide, plan.downsample

        def read(loc):
            y, x = loc
            region = slide.read_region((round(y * ds), round(x * ds)), self.patch_size, level=plan.level)
            return torch.from_numpy(np.ascontiguousarray(region.transpose(2, 0, 1)))[None]

        bar = tqdm(
            total=plan.tissue_tiles, desc=f"{_name(slide.path)} tiles", unit="tile", disable=not self.progress
        )
        with ThreadPoolExecutor(max_workers=self.read_ahead, thread_name_prefix="tile-reader") as pool:
            pending: deque = deque()
            todo = iter(plan.locations)
            for loc in todo:
                pending.append((loc, pool.submit(read, loc)))
                if len(pending) >= self.read_ahead:
                    break
            while pending:
                loc, future = pending.popleft()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append((nxt, pool.submit(read, nxt)))
                patch = future.result()
                bar.update(1)
                yield (patch.to(self.device) if self.device is not None else patch), loc
        bar.close()


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1]
