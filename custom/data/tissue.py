"""Where the tissue is: Otsu on HSV saturation at a low-resolution level, cleaned, cached per slide.

Training draws patch centres from this mask and inference tiles only what it covers, so both
spend their time on tissue, never on glass.

Not MONAI's `ForegroundMask`: it thresholds the same HSV channel, but has no smoothing, no cleanup
sized in um and no cache; ours runs once on the thumbnail that inference reads anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter
from skimage.filters import threshold_otsu
from skimage.morphology import remove_small_holes, remove_small_objects

from custom.io import atomic_write

# The coarsest level whose long side is at least this many pixels: fine enough to see tissue
# outlines, small enough to read whole in well under a second.
TARGET_LONG_SIDE_PX = 1024
# The slide picture read once per slide (for the overlay, and for tissue detection when the
# tissue level is not cached): the finest level whose long side is at most this.
THUMBNAIL_MAX_SIDE_PX = 2048
# Glass is grey-white (saturation ~0); a floor under Otsu keeps a blank slide from being split
# into "tissue" and "slightly less white glass".
MIN_SATURATION = 0.05
MIN_OBJECT_UM2 = 20_000.0  # specks of dust and debris smaller than ~140 x 140 um are dropped
MAX_HOLE_UM2 = 200_000.0  # holes smaller than ~450 x 450 um (lumens, vessels, cracks) are filled
MIN_TISSUE_FRACTION = 0.001  # below this the slide is reported as having no tissue
# Saturation is smoothed before thresholding so pale interstitium and lumens between stained
# structures stay inside the tissue instead of cutting it into specks.
SMOOTH_UM = 16.0
FALLBACK_SMOOTH_PX = 2.0
# Without an mpp, sizes fall back to fractions of the thumbnail's area.
FALLBACK_OBJECT_FRACTION = 1e-4
FALLBACK_HOLE_FRACTION = 1e-3


@dataclass
class TissueMask:
    mask: np.ndarray  # bool, at `level`
    level: int
    scale: tuple[float, float]  # level-0 pixels per mask pixel, (y, x)
    threshold: float  # saturation threshold used, 0..1

    @property
    def fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def empty(self) -> bool:
        return not self.mask.any()

    def box_fraction(self, location: tuple[int, int], size0: tuple[int, int]) -> float:
        """Tissue fraction of a level-0 box (top-left `location`, `size0` level-0 pixels)."""
        (y0, x0), (y1, x1) = self._box(location, size0)
        if y1 <= y0 or x1 <= x0:
            return 0.0
        return float(self.mask[y0:y1, x0:x1].mean())

    def touches(self, location: tuple[int, int], size0: tuple[int, int]) -> bool:
        (y0, x0), (y1, x1) = self._box(location, size0)
        return bool(self.mask[y0:y1, x0:x1].any())

    def sample_centres(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """`count` level-0 (y, x) points drawn uniformly from the tissue area."""
        ys, xs = np.nonzero(self.mask)
        if ys.size == 0:
            raise ValueError("no tissue to sample from")
        pick = rng.integers(0, ys.size, size=count)
        # uniform inside the chosen mask pixel, so centres are not locked to the thumbnail grid
        jitter = rng.random((count, 2))
        y = (ys[pick] + jitter[:, 0]) * self.scale[0]
        x = (xs[pick] + jitter[:, 1]) * self.scale[1]
        return np.stack([y, x], axis=1).astype(np.int64)

    def _box(self, location, size0):
        sy, sx = self.scale
        y0 = int(np.floor(location[0] / sy))
        x0 = int(np.floor(location[1] / sx))
        y1 = int(np.ceil((location[0] + size0[0]) / sy))
        x1 = int(np.ceil((location[1] + size0[1]) / sx))
        h, w = self.mask.shape
        return (max(0, y0), max(0, x0)), (min(h, y1), min(w, x1))


def tissue_level(slide, long_side_px: int = TARGET_LONG_SIDE_PX) -> int:
    """The coarsest level whose long side is still >= `long_side_px` (level 0 if none is)."""
    level = 0
    for i, (h, w) in enumerate(slide.level_shapes):
        if max(h, w) >= long_side_px:
            level = i
    return level


def thumbnail_level(slide, max_side_px: int = THUMBNAIL_MAX_SIDE_PX) -> int:
    """The finest level whose long side is at most `max_side_px` (the coarsest level if none is)."""
    for i, (h, w) in enumerate(slide.level_shapes):
        if max(h, w) <= max_side_px:
            return i
    return slide.level_count - 1


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an (h, w, 3) uint8 image."""
    rgb = rgb.astype(np.float32)
    hi = rgb.max(axis=-1)
    lo = rgb.min(axis=-1)
    return np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)


def detect_tissue(
    slide,
    level: int | None = None,
    threshold: float | None = None,
    min_saturation: float = MIN_SATURATION,
    min_object_um2: float = MIN_OBJECT_UM2,
    max_hole_um2: float = MAX_HOLE_UM2,
    min_fraction: float = MIN_TISSUE_FRACTION,
    thumbnail: tuple[int, np.ndarray] | None = None,
) -> TissueMask:
    """Tissue mask of an opened slide (`custom.wsi.reader.open_slide`).

    `threshold` overrides Otsu (saturation in 0..1). A mask covering less than `min_fraction` of
    the level is returned empty: the caller reports "no tissue" rather than tiling specks.
    `thumbnail` (level, RGB) already read is used instead of reading the level again when it is
    that level or a finer one (box-averaged down, as the slide's own pyramid was made).
    """
    if level is None:
        level = tissue_level(slide)
    rgb = _level_pixels(slide, level, thumbnail)
    h0, w0 = slide.level_shapes[0]
    scale = (h0 / rgb.shape[0], w0 / rgb.shape[1])
    sigma_px = SMOOTH_UM / (slide.mpp[1] * scale[1]) if slide.mpp else FALLBACK_SMOOTH_PX
    sat = gaussian_filter(saturation(rgb), sigma=max(sigma_px, 0.5))
    if threshold is None:
        threshold = max(float(threshold_otsu(sat)) if np.ptp(sat) > 0 else 1.0, min_saturation)
    mask = sat > threshold
    px_area_um2 = _pixel_area_um2(slide, scale)
    if px_area_um2 is None:
        min_px, hole_px = FALLBACK_OBJECT_FRACTION * mask.size, FALLBACK_HOLE_FRACTION * mask.size
    else:
        min_px, hole_px = min_object_um2 / px_area_um2, max_hole_um2 / px_area_um2
    mask = remove_small_objects(mask, max_size=max(1, int(min_px)))
    mask = remove_small_holes(mask, max_size=max(1, int(hole_px)))
    if mask.mean() < min_fraction:
        mask = np.zeros_like(mask)
    return TissueMask(mask=mask, level=level, scale=scale, threshold=float(threshold))


class TissueCache:
    """Tissue masks per slide, in memory and optionally on disk (npz), keyed by file and settings.

    The key includes the file's size and modification time, so a re-written slide is re-detected.
    """

    def __init__(self, cache_dir: str | Path | None = None, max_items: int = 64, **settings):
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.max_items = max_items
        self.settings = settings
        self._memory: OrderedDict[str, TissueMask] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, slide, thumbnail: tuple[int, np.ndarray] | None = None) -> TissueMask:
        """The slide's tissue mask; `thumbnail` (level, RGB) spares a read when it must be detected."""
        key = self._key(slide.path)
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        tissue = self._load(key)
        if tissue is None:
            tissue = detect_tissue(slide, thumbnail=thumbnail, **self.settings)
            self._store(key, tissue)
        with self._lock:
            self._memory[key] = tissue
            while len(self._memory) > self.max_items:
                self._memory.popitem(last=False)
        return tissue

    def _key(self, path: str) -> str:
        stat = os.stat(path)
        ident = json.dumps(
            [os.path.abspath(path), stat.st_size, stat.st_mtime_ns, self.settings], sort_keys=True
        )
        return hashlib.sha1(ident.encode()).hexdigest()[:20]

    def _load(self, key: str) -> TissueMask | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"tissue_{key}.npz"
        if not path.is_file():
            return None
        with np.load(path) as data:
            return TissueMask(
                mask=data["mask"],
                level=int(data["level"]),
                scale=(float(data["scale"][0]), float(data["scale"][1])),
                threshold=float(data["threshold"]),
            )

    def _store(self, key: str, tissue: TissueMask) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.cache_dir / f"tissue_{key}.npz") as tmp:
            np.savez_compressed(
                tmp,
                mask=tissue.mask,
                level=tissue.level,
                scale=np.array(tissue.scale),
                threshold=tissue.threshold,
            )


def _level_pixels(slide, level: int, thumbnail: tuple[int, np.ndarray] | None) -> np.ndarray:
    if thumbnail is not None and thumbnail[0] <= level:
        h, w = slide.level_shapes[level]
        rgb = thumbnail[1]
        return rgb if rgb.shape[:2] == (h, w) else cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    return slide.read_level(level)


def _pixel_area_um2(slide, scale) -> float | None:
    if slide.mpp is None:
        return None
    return slide.mpp[0] * scale[0] * slide.mpp[1] * scale[1]
