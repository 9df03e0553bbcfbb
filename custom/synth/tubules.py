"""Renal cortex (and medulla) between the glomeruli: tubule cross-sections with pale lumens, PAS-bright
basement membranes and brush borders, epithelial nuclei along the membrane, and interstitium with
spindle nuclei.

Tubules are ellipses, one per cell of a jittered grid, turned to the scene's orientation field, so
texture is the same everywhere and only its orientation follows the cortex or medulla.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from custom.synth.noise import cell_uniforms
from custom.synth.paint import (
    EDGE_SOFTNESS_UM,
    H_NUCLEUS,
    MIN_FEATURE_PX,
    PAS_INTERSTITIUM,
    PAS_LUMEN,
    PAS_MEMBRANE,
    CoarseGrid,
    aa_step,
    jittered_points,
    level_coords,
    splat_nuclei,
)
from custom.synth.scene import Scene

TUBULE_JITTER = 0.7  # of the spacing; below 1 keeps each centre's nearest rivals in the 3x3 cells
TUBULE_SHORT_AXIS = (0.38, 0.48)  # semi-axis across the tubule, in tubule spacings
TUBULE_ASPECT = (1.25, 2.1)  # oblique cuts: long / short axis
TUBULE_LONG_AXIS_MAX = 1.0  # in spacings
TUBULE_ORIENTATION_JITTER_RAD = 0.15
LUMEN_PROXIMAL = (0.18, 0.38)  # lumen radius / tubule radius
LUMEN_DISTAL = (0.42, 0.6)
INTERSTITIUM_HALF_UM = 1.5  # half the gap between touching tubules
BASEMENT_MEMBRANE_UM = 1.3
BRUSH_BORDER_UM = 1.6
NUCLEUS_SPACING_UM = 7.5  # one candidate nucleus per cell of this side
NUCLEUS_RADIUS_UM = (2.2, 3.4)
PAS_PROXIMAL = 0.5
PAS_DISTAL = 0.3
PAS_BRUSH_BORDER = 0.95
H_CYTOPLASM = 0.05
MEAN_SAMPLE_TILES = 16  # 256-px level-0 patches averaged for the means; tile-sized keeps memory flat

_mean_lock = threading.Lock()


def _tubule_params(scene: Scene, cells_x: np.ndarray, cells_y: np.ndarray) -> np.ndarray:
    """(len(cells_y), len(cells_x), 9): centre x, y, cos, sin, 1/long, 1/short, lumen, proximal, tint."""
    g = scene.tubule_spacing_px
    u = cell_uniforms(cells_x[None, :], cells_y[:, None], scene.key("tubules"), 8)
    tx = (cells_x[None, :] + 0.5 + TUBULE_JITTER * (u[..., 0] - 0.5)) * g
    ty = (cells_y[:, None] + 0.5 + TUBULE_JITTER * (u[..., 1] - 0.5)) * g
    theta = scene.orientation_points(tx, ty) + (2 * u[..., 2] - 1) * TUBULE_ORIENTATION_JITTER_RAD
    b = g * (TUBULE_SHORT_AXIS[0] + (TUBULE_SHORT_AXIS[1] - TUBULE_SHORT_AXIS[0]) * u[..., 3])
    a = np.minimum(
        b * (TUBULE_ASPECT[0] + (TUBULE_ASPECT[1] - TUBULE_ASPECT[0]) * u[..., 4]), TUBULE_LONG_AXIS_MAX * g
    )
    proximal = (u[..., 5] < scene.proximal_fraction).astype(np.float64)
    lumen = np.where(
        proximal > 0,
        LUMEN_PROXIMAL[0] + (LUMEN_PROXIMAL[1] - LUMEN_PROXIMAL[0]) * u[..., 6],
        LUMEN_DISTAL[0] + (LUMEN_DISTAL[1] - LUMEN_DISTAL[0]) * u[..., 6],
    )
    tint = 0.85 + 0.3 * u[..., 7]
    return np.stack([tx, ty, np.cos(theta), np.sin(theta), 1 / a, 1 / b, lumen, proximal, tint], axis=-1)


def tubule_fields(scene: Scene, x: np.ndarray, y: np.ndarray, dtype=np.float64) -> dict[str, np.ndarray]:
    """Nearest-tubule geometry at level-0 points x, y (broadcast together).

    Tubules are ellipses, one per jittered grid cell, each turned to the orientation field at its
    centre. A point belongs to the tubule with the smallest normalised radius rho (a power-diagram
    partition, so touching tubules share a border). Returns rho1, rho2 (nearest and second), and
    the nearest tubule's lumen radius, proximal flag (0/1) and tint.
    """
    g = scene.tubule_spacing_px
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ci, cj = np.floor(x / g).astype(np.int64), np.floor(y / g).astype(np.int64)
    i0, j0 = int(ci.min()) - 1, int(cj.min()) - 1
    cells_x, cells_y = np.arange(i0, int(ci.max()) + 2), np.arange(j0, int(cj.max()) + 2)
    params = _tubule_params(scene, cells_x, cells_y).reshape(-1, 9)
    # Offsets from a local origin keep float32 exact enough (< 1e-3 px) on any slide size.
    origin_x, origin_y = i0 * g, j0 * g
    params[:, 0] -= origin_x
    params[:, 1] -= origin_y
    columns = [np.ascontiguousarray(params[:, k], dtype) for k in range(6)]
    lx, ly = (x - origin_x).astype(dtype), (y - origin_y).astype(dtype)
    base = (cj - j0) * len(cells_x) + (ci - i0)

    rho1 = rho2 = best = None
    for dj in (-1, 0, 1):
        for di in (-1, 0, 1):
            cell = base + (dj * len(cells_x) + di)
            dx, dy = lx - columns[0][cell], ly - columns[1][cell]
            cos, sin = columns[2][cell], columns[3][cell]
            along = (dx * cos + dy * sin) * columns[4][cell]
            across = (dy * cos - dx * sin) * columns[5][cell]
            rho = np.sqrt(along * along + across * across)
            if rho1 is None:
                rho1, rho2, best = rho, np.full_like(rho, np.inf), cell
                continue
            closer = rho < rho1
            rho2 = np.where(closer, rho1, np.minimum(rho2, rho))
            best = np.where(closer, cell, best)
            rho1 = np.where(closer, rho, rho1)
    attrs = params[best, 6:].astype(dtype)
    return {
        "rho1": rho1,
        "rho2": rho2,
        "lumen": attrs[..., 0],
        "proximal": attrs[..., 1],
        "tint": attrs[..., 2],
    }


def inward_px(scene: Scene, f: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 distances: inward from the tubule outline (to its own ellipse, or to the border with
    the next tubule; rho2 - rho1 grows about twice as fast as rho1), and outward from its lumen."""
    b_mean_px = scene.tubule_spacing_px * sum(TUBULE_SHORT_AXIS) / 2
    inward = np.minimum(1.0 - f["rho1"], (f["rho2"] - f["rho1"]) / 2) * b_mean_px
    return inward, (f["rho1"] - f["lumen"]) * b_mean_px


def background(scene: Scene, grid: CoarseGrid, tissue_c: np.ndarray, xs, ys, ds: int, aa_px: float):
    """Tissue field, and PAS and haematoxylin concentrations of tubules, interstitium and nuclei."""
    um = 1.0 / scene.mpp
    if scene.tubule_spacing_px / ds < 2 * MIN_FEATURE_PX:
        (tissue,) = grid.upsample(tissue_c[None])
        pas_mean, h_mean = mean_background(scene)
        return tissue, np.full(tissue.shape, pas_mean, np.float32), np.full(tissue.shape, h_mean, np.float32)

    f = tubule_fields(scene, grid.xs[None, :], grid.ys[:, None], dtype=np.float32)
    inward, from_lumen = inward_px(scene, f)
    cytoplasm = f["tint"] * (PAS_DISTAL + (PAS_PROXIMAL - PAS_DISTAL) * f["proximal"])
    coarse = np.stack([tissue_c, inward, from_lumen, cytoplasm, f["proximal"]]).astype(np.float32)
    tissue, inward, from_lumen, cytoplasm, proximal = grid.upsample(coarse)

    tubule = aa_step(inward - INTERSTITIUM_HALF_UM * um, aa_px)
    wall = aa_step(inward - (INTERSTITIUM_HALF_UM + BASEMENT_MEMBRANE_UM) * um, aa_px)
    outside_lumen = aa_step(from_lumen, aa_px)
    brush = outside_lumen - aa_step(from_lumen - BRUSH_BORDER_UM * um, aa_px)
    brush *= proximal  # proximal tubules only: a PAS-bright band lining the lumen
    # PAS: interstitium, basement membrane, cytoplasm, brush border, lumen (weights sum to 1).
    pas = PAS_INTERSTITIUM * (1 - tubule)
    pas += PAS_MEMBRANE * (tubule - wall)
    epithelium = wall * outside_lumen
    pas += cytoplasm * (epithelium - wall * brush)
    pas += PAS_BRUSH_BORDER * wall * brush
    pas += PAS_LUMEN * (wall - epithelium)
    hx = H_CYTOPLASM * epithelium
    _background_nuclei(scene, xs, ys, ds, pas, hx)
    return tissue, pas, hx


def _background_nuclei(scene: Scene, xs, ys, ds: int, pas, hx) -> None:
    """Epithelial nuclei along the basement membrane, sparse spindle nuclei in the interstitium."""
    um = 1.0 / scene.mpp
    if NUCLEUS_RADIUS_UM[0] * um / ds < MIN_FEATURE_PX / 2:
        pas_mean, h_mean = mean_nuclei(scene)
        pas += pas_mean
        hx += h_mean
        return
    pad = 2.5 * NUCLEUS_RADIUS_UM[1] * um
    cx, cy, u = jittered_points(xs, ys, NUCLEUS_SPACING_UM * um, pad, scene.key("nuclei"), 6)
    inward, from_lumen = inward_px(scene, tubule_fields(scene, cx, cy))
    membrane_um = INTERSTITIUM_HALF_UM + BASEMENT_MEMBRANE_UM
    in_wall = (inward > (membrane_um + 2.0) * um) & (from_lumen > 3.0 * um)
    basal = in_wall & (inward < (membrane_um + 5.0) * um)
    interstitial = inward < 0
    keep = u[:, 2] < np.select([basal, in_wall, interstitial], [0.9, 0.06, 0.2], 0.0)
    if not keep.any():
        return
    radius = (NUCLEUS_RADIUS_UM[0] + (NUCLEUS_RADIUS_UM[1] - NUCLEUS_RADIUS_UM[0]) * u[keep, 3]) * um
    elongation = np.where(interstitial[keep], 2.2, 1.0 + 0.35 * u[keep, 4])  # fibroblasts are spindles
    darkness = H_NUCLEUS[0] + (H_NUCLEUS[1] - H_NUCLEUS[0]) * u[keep, 4]
    r_major, r_minor = radius * np.sqrt(elongation), radius / np.sqrt(elongation)
    splat_nuclei(hx, pas, cx[keep], cy[keep], r_major, r_minor, u[keep, 5] * math.pi, darkness, xs, ys, ds)


def mean_background(scene: Scene) -> tuple[float, float]:
    """Mean PAS and haematoxylin of tubular tissue (for levels too coarse to show tubules)."""
    return _cached_means(scene)[0]


def mean_nuclei(scene: Scene) -> tuple[float, float]:
    """Mean PAS and haematoxylin that nuclei add (for levels too coarse to show them)."""
    return _cached_means(scene)[1]


def _cached_means(scene: Scene):
    with _mean_lock:
        if "means" not in scene.cache:
            um = 1.0 / scene.mpp
            side = 256
            totals = np.zeros(4)
            for i in range(MEAN_SAMPLE_TILES):
                # Patches on a diagonal through the slide centre: enough tubules for a stable mean.
                y = scene.height // 2 + (i - MEAN_SAMPLE_TILES // 2) * side
                x = scene.width // 2 + (i - MEAN_SAMPLE_TILES // 2) * side * 3
                grid = CoarseGrid(0, y, x, side, side)
                xs, ys, _ = level_coords(0, y, x, side, side)
                tissue_c = np.zeros((len(grid.ys), len(grid.xs)), np.float32)
                _, pas, hx = background(scene, grid, tissue_c, xs, ys, 1, EDGE_SOFTNESS_UM * um)
                pas_n, h_n = np.zeros_like(pas), np.zeros_like(hx)
                _background_nuclei(scene, xs, ys, 1, pas_n, h_n)
                totals += [pas.mean(), hx.mean(), pas_n.mean(), h_n.mean()]
            means = totals / MEAN_SAMPLE_TILES
            scene.cache["means"] = ((float(means[0]), float(means[1])), (float(means[2]), float(means[3])))
        return scene.cache["means"]
