"""Glomerulus-like objects: capsule outline (the mask), Bowman's space, lobulated tuft with open
capillary loops, mesangial matrix and dense nuclei, and flat parietal nuclei lining the capsule.

Decoys are painted by exactly the same code; only the mask (render.py) tells them apart.
"""

from __future__ import annotations

import math

import numpy as np

from custom.synth.noise import hash_uniform, stream_key
from custom.synth.paint import (
    H_NUCLEUS,
    MIN_FEATURE_PX,
    PAS_INTERSTITIUM,
    PAS_LUMEN,
    PAS_MEMBRANE,
    aa_step,
    ellipse_cover,
    jittered_points,
    max_into,
    splat_nuclei,
)
from custom.synth.scene import Scene

GLOM_NUCLEUS_SPACING_UM = 5.5
GLOM_NUCLEUS_RADIUS_UM = (1.9, 2.6)
GLOM_NUCLEUS_KEEP = 0.6
CAPSULE_UM = 2.5
PERIGLOMERULAR_RIM_UM = 4.0
CAPILLARY_SPACING_UM = 7.0
CAPILLARY_RADIUS_UM = (2.0, 3.4)
PARIETAL_NUCLEUS_SPACING_UM = 16.0
PAS_MESANGIUM = 0.8
PAS_CAPILLARY = 0.12
H_TUFT = 0.06
# Mean haematoxylin the tuft nuclei add: kept share x nucleus area / cell area x mean darkness,
# times 0.65 for overlaps (drawn by maximum) and paler rims: measured so the tuft keeps its level-0
# colour at the levels that drop its nuclei (tests check every level).
GLOM_NUCLEI_MEAN_H = (
    GLOM_NUCLEUS_KEEP
    * math.pi
    * (sum(GLOM_NUCLEUS_RADIUS_UM) / 2) ** 2
    / GLOM_NUCLEUS_SPACING_UM**2
    * (H_NUCLEUS[0] + 0.35 / 2)
    * 0.65
)


def _capsule_radius(scene: Scene, j: int, phi: np.ndarray) -> np.ndarray:
    """The capsule outline (level-0 px) of object j in directions phi, float64: the sidecar formula."""
    o = scene.objects
    shape = np.ones_like(phi)
    for k, amp, phase in o.outline[j]:
        shape += amp * np.cos(k * phi + phase)
    return shape * o.radius[j]


def capsule_s(scene: Scene, j: int, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Normalised radius of the capsule outline of object j: <= 1 inside (the mask), float64."""
    return np.hypot(dx, dy) / _capsule_radius(scene, j, np.arctan2(dy, dx))


def object_window(scene: Scene, j: int, xs: np.ndarray, ys: np.ndarray, reach: float):
    """Row and column slices of the region within `reach` level-0 px of object j, or None."""
    cx, cy = scene.objects.cx[j], scene.objects.cy[j]
    c0, c1 = np.searchsorted(xs, [cx - reach, cx + reach])
    r0, r1 = np.searchsorted(ys, [cy - reach, cy + reach])
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def radii_at(scene: Scene, j: int, phi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Capsule and tuft outline radii (level-0 px) of object j in directions phi."""
    o = scene.objects
    capsule = _capsule_radius(scene, j, phi)
    tuft = np.full_like(phi, o.tuft_scale[j])
    for k, amp, phase in o.tuft[j]:
        tuft += o.tuft_scale[j] * amp * np.cos(k * phi + phase)
    return capsule, capsule * tuft


def paint_object(scene: Scene, j: int, xs, ys, ds: int, aa_px: float, pas, hx) -> None:
    """Paint object j: periglomerular rim, capsule, Bowman's space, lobulated tuft with nuclei."""
    o = scene.objects
    um = 1.0 / scene.mpp
    rim_px = PERIGLOMERULAR_RIM_UM * um
    win = object_window(scene, j, xs, ys, o.max_radius[j] + rim_px + aa_px)
    if win is None:
        return
    rows, cols = win
    lx, ly = xs[cols], ys[rows]
    dx, dy = lx[None, :] - o.cx[j], ly[:, None] - o.cy[j]
    capsule_r, tuft_r = radii_at(scene, j, np.arctan2(dy, dx))
    r = np.hypot(dx, dy)
    inside_capsule = (capsule_r - r).astype(np.float32)  # level-0 px, > 0 inside
    cover = aa_step(inside_capsule + rim_px, aa_px)
    within = aa_step(inside_capsule, aa_px)
    bowman = aa_step(inside_capsule - CAPSULE_UM * um, aa_px)
    tuft = aa_step((tuft_r - r).astype(np.float32), aa_px)
    key = stream_key(scene.key("objects"), str(j))
    loops = _capillary_loops(scene, j, key, lx, ly, ds)
    pas_obj = PAS_INTERSTITIUM * (1 - within) + PAS_MEMBRANE * (within - bowman)
    pas_obj += PAS_LUMEN * bowman * (1 - tuft) + loops * tuft
    pas_obj *= o.tint[j]
    sub_pas, sub_h = pas[rows, cols], hx[rows, cols]
    sub_pas += cover * (pas_obj - sub_pas)
    # Nuclei too small for this level still darken the tuft by their mean, so it has the same
    # colour at every level.
    nuclei_resolved = GLOM_NUCLEUS_RADIUS_UM[0] * um / ds >= MIN_FEATURE_PX / 2
    h_tuft = H_TUFT if nuclei_resolved else H_TUFT + GLOM_NUCLEI_MEAN_H
    sub_h += cover * (h_tuft * tuft - sub_h)
    if nuclei_resolved:
        _object_nuclei(scene, j, key, lx, ly, ds, sub_pas, sub_h)


def _capillary_loops(scene: Scene, j: int, key: int, lx, ly, ds: int) -> np.ndarray:
    """PAS of the tuft: mesangial matrix around round open capillary lumens."""
    o = scene.objects
    um = 1.0 / scene.mpp
    radius_um = CAPILLARY_RADIUS_UM
    open_fraction = 0.4  # share of the tuft that is capillary lumen, roughly
    mean = np.float32((1 - open_fraction) * PAS_MESANGIUM + open_fraction * PAS_CAPILLARY)
    # Lumens fade into their mean as they approach the output pixel size.
    detail = float(np.clip((2 * radius_um[0] * um / ds - MIN_FEATURE_PX) / (2 * MIN_FEATURE_PX), 0.0, 1.0))
    if detail == 0:
        return mean
    pad = 2 * radius_um[1] * um
    cx, cy, u = jittered_points(lx, ly, CAPILLARY_SPACING_UM * um, pad, stream_key(key, "capillaries"), 4)
    dx, dy = cx - o.cx[j], cy - o.cy[j]
    _, tuft_r = radii_at(scene, j, np.arctan2(dy, dx))
    keep = (np.hypot(dx, dy) < tuft_r - radius_um[0] * um) & (u[:, 2] < 0.85)
    lumen = np.zeros((len(ly), len(lx)), np.float32)
    if keep.any():
        r = (radius_um[0] + (radius_um[1] - radius_um[0]) * u[keep, 3]) * um
        flat, cover, _, drawn = ellipse_cover(
            lumen.shape, cx[keep], cy[keep], r * 1.15, r / 1.15, u[keep, 3] * math.pi, lx, ly, ds
        )
        max_into(lumen, flat, cover[drawn])
    sharp = PAS_MESANGIUM * (1 - lumen) + PAS_CAPILLARY * lumen
    return detail * sharp + (1 - detail) * mean


def _object_nuclei(scene: Scene, j: int, key: int, lx, ly, ds: int, sub_pas, sub_h) -> None:
    """Nuclei in the tuft (mesangial and endothelial) and flat parietal nuclei lining the capsule."""
    o = scene.objects
    um = 1.0 / scene.mpp
    pad = 3 * GLOM_NUCLEUS_RADIUS_UM[1] * um
    cx, cy, u = jittered_points(lx, ly, GLOM_NUCLEUS_SPACING_UM * um, pad, key, 5)
    dx, dy = cx - o.cx[j], cy - o.cy[j]
    _, tuft_r = radii_at(scene, j, np.arctan2(dy, dx))
    keep = (np.hypot(dx, dy) < tuft_r - 2.0 * um) & (u[:, 2] < GLOM_NUCLEUS_KEEP)

    n_par = max(6, int(2 * math.pi * o.radius[j] / (PARIETAL_NUCLEUS_SPACING_UM * um)))
    idx = np.arange(n_par)
    pu = hash_uniform(idx, np.full_like(idx, 7), key)
    phi = 2 * math.pi * (idx + 0.4 * pu) / n_par
    par = pu < 0.7
    capsule_r, _ = radii_at(scene, j, phi[par])
    par_r = capsule_r - (CAPSULE_UM + 1.0) * um
    radius = (
        GLOM_NUCLEUS_RADIUS_UM[0] + (GLOM_NUCLEUS_RADIUS_UM[1] - GLOM_NUCLEUS_RADIUS_UM[0]) * u[keep, 3]
    ) * um
    n_par_kept = int(par.sum())
    splat_nuclei(
        sub_h,
        sub_pas,
        np.concatenate([cx[keep], o.cx[j] + par_r * np.cos(phi[par])]),
        np.concatenate([cy[keep], o.cy[j] + par_r * np.sin(phi[par])]),
        np.concatenate([radius * 1.1, np.full(n_par_kept, 3.2 * um)]),
        np.concatenate([radius / 1.1, np.full(n_par_kept, 1.2 * um)]),
        # Parietal cells lie flat along the capsule.
        np.concatenate([u[keep, 4] * math.pi, phi[par] + math.pi / 2]),
        np.concatenate([H_NUCLEUS[0] + 0.35 * u[keep, 4], np.full(n_par_kept, H_NUCLEUS[0])]),
        lx,
        ly,
        ds,
    )
