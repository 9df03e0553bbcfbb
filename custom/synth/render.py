"""Render any region of any level of a synthetic slide, straight from its Scene.

A region is rendered at its own resolution: pixel centres are mapped to level-0 coordinates, the
continuous fields are evaluated there, and texture finer than about two output pixels is left out
or anti-aliased, so coarse levels do not alias and never re-read level 0. Painters (tubules.py,
glomeruli.py) set PAS and haematoxylin concentrations; a Beer-Lambert stain model turns them into
RGB. The mask is the same geometry rasterised at the same pixel centres.

Coordinates: level-L pixel (row i, col j) covers level-0 [j * 2**L, (j + 1) * 2**L) and is
sampled at its centre.
"""

from __future__ import annotations

import numpy as np

from custom.synth.glomeruli import capsule_s, object_window, paint_object
from custom.synth.noise import fbm_grid
from custom.synth.paint import EDGE_SOFTNESS_UM, MIN_FEATURE_PX, CoarseGrid, aa_step, level_coords
from custom.synth.scene import GLOMERULUS, TISSUE_BUMP_PAD_PX, TISSUE_BUMP_SCALE, Scene
from custom.synth.tubules import background

# Stain concentrations are turned into RGB through a per-slide lookup table (one gather instead of
# an exp per channel); this many steps per unit of concentration keep errors under one grey level.
LUT_STEPS_PER_UNIT = 256
LUT_MAX_CONCENTRATION = 2.0
_LUT_SIZE = int(LUT_STEPS_PER_UNIT * LUT_MAX_CONCENTRATION) + 1


def render_mask(scene: Scene, level: int, y: int, x: int, h: int, w: int, decoy_value: int = 0) -> np.ndarray:
    """Ground truth at level L: 1 where the pixel centre lies inside a glomerulus capsule outline.

    Decoys are background (0), as a mimic is on a real slide's mask, unless `decoy_value` marks them.
    """
    xs, ys, ds = level_coords(level, y, x, h, w)
    mask = np.zeros((h, w), np.uint8)
    for j in scene.index.query(x * ds, y * ds, (x + w) * ds, (y + h) * ds):
        value = 1 if scene.objects.label[j] == GLOMERULUS else decoy_value
        if not value:
            continue
        win = object_window(scene, j, xs, ys, scene.objects.max_radius[j])
        if win is None:
            continue
        rows, cols = win
        s = capsule_s(
            scene, j, xs[cols][None, :] - scene.objects.cx[j], ys[rows][:, None] - scene.objects.cy[j]
        )
        inside = s <= 1.0
        mask[rows, cols][inside] = value  # objects keep a gap, so none overwrites another
    return mask


def render_rgb(
    scene: Scene, level: int, y: int, x: int, h: int, w: int, stats: dict | None = None
) -> np.ndarray:
    """RGB uint8 (h, w, 3) of a level-L region. `stats` (optional) receives the tissue pixel count."""
    xs, ys, ds = level_coords(level, y, x, h, w)
    um = 1.0 / scene.mpp
    ids = scene.index.query(x * ds, y * ds, (x + w) * ds, (y + h) * ds)
    grid = CoarseGrid(level, y, x, h, w)
    tissue_c = scene.tissue_grid(grid.xs, grid.ys, ds)
    if len(ids) == 0 and tissue_c.max() < -0.5 * ds:
        # Bilinear interpolation never exceeds its samples: no tissue anywhere in this region.
        if stats is not None:
            stats["tissue_px"] = 0
        return np.broadcast_to(_glass(scene), (h, w, 3)).copy()

    aa_px = max(float(ds), EDGE_SOFTNESS_UM * um)  # edge width in level-0 px
    tissue, pas, hx = background(scene, grid, tissue_c, xs, ys, ds, aa_px)
    for j in ids:
        _tissue_bump(scene, j, xs, ys, tissue)
    # The tissue field is roughly a distance in level-0 px: one output pixel of anti-aliasing.
    alpha = aa_step(tissue, float(ds))
    if stats is not None:
        stats["tissue_px"] = int(np.count_nonzero(alpha >= 0.5))
    for j in ids:
        paint_object(scene, j, xs, ys, ds, aa_px, pas, hx)
    grain = fbm_grid(xs, ys, [(1.5 * um, 0.2), (4.0 * um, 0.12)], scene.key("grain"), MIN_FEATURE_PX * ds)
    grain += 1.0
    grain *= alpha
    pas *= grain
    hx *= alpha
    return _stain_lut(scene)[_lut_index(pas) * _LUT_SIZE + _lut_index(hx)]


def _lut_index(conc: np.ndarray) -> np.ndarray:
    conc *= LUT_STEPS_PER_UNIT
    conc += 0.5
    np.clip(conc, 0, _LUT_SIZE - 1, out=conc)
    return conc.astype(np.int32)


def _stain_lut(scene: Scene) -> np.ndarray:
    """(_LUT_SIZE**2, 3) uint8: Beer-Lambert RGB for each (PAS, haematoxylin) concentration pair."""
    lut = scene.cache.get("stain_lut")
    if lut is None:
        c = np.arange(_LUT_SIZE, dtype=np.float64) / LUT_STEPS_PER_UNIT
        od = c[:, None, None] * scene.stain.od_pas + c[None, :, None] * scene.stain.od_h
        lut = np.clip(scene.stain.glass * np.exp(-od) + 0.5, 0, 255).astype(np.uint8).reshape(-1, 3)
        scene.cache["stain_lut"] = lut  # same value from any thread, so a race only wastes work
    return lut


def _glass(scene: Scene) -> np.ndarray:
    return np.clip(np.round(scene.stain.glass), 0, 255).astype(np.uint8)


def _tissue_bump(scene: Scene, j: int, xs: np.ndarray, ys: np.ndarray, tissue: np.ndarray) -> None:
    """Every object sits in tissue: raise the field to a disc around it (planted ones need it)."""
    o = scene.objects
    reach = TISSUE_BUMP_SCALE * o.max_radius[j] + TISSUE_BUMP_PAD_PX
    win = object_window(scene, j, xs, ys, reach)
    if win is None:
        return
    rows, cols = win
    d = np.hypot(xs[cols][None, :] - o.cx[j], ys[rows][:, None] - o.cy[j])
    np.maximum(tissue[rows, cols], (reach - d).astype(np.float32), out=tissue[rows, cols])
