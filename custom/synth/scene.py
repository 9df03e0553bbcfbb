"""The geometry of one synthetic slide, fixed by its seed: tissue outline, stain, tubule layout,
cortex/medulla orientation fields and the glomerulus-like objects, with a grid index over them.

Everything is a continuous function of level-0 coordinates (pixel i spans [i, i + 1)) or a short
list of objects, so any level can be rendered from it directly and the memory it takes grows only
with the number of glomeruli, never with the pixel count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from custom.synth.noise import fbm_grid, fbm_points, stream_key, value_noise_points

MPP_DEFAULT = 0.25
INDEX_BUCKET_PX = 1024  # level-0 side of one spatial-index bucket
GLOMERULUS = 1
DECOY = 0

# Physical scales (micrometres) of the kidney-like texture.
TUBULE_SPACING_UM = (48.0, 62.0)  # centre-to-centre spacing of tubule cross-sections, per slide
# Cortex tubule orientation turns steadily along one direction, plus a wobble, so that it rotates
# by ~2-3 rad across any 2 mm (a 4K window at level 1) but only ~0.3 rad across 256 um (a 512-px
# window at level 1). The medulla keeps one orientation: that is the decoys' only tell.
CORTEX_TURN_RAD_PER_MM = 1.3
CORTEX_WOBBLE_RAD_PER_MM = 0.5  # RMS turning rate of the wobble waves
ORIENTATION_WAVELENGTH_MM = (3.0, 6.0)
MEDULLA_EDGE_UM = 75.0  # half-width of the cortico-medullary transition
MEDULLA_WAVE_UM = (2500.0, 250.0)  # the boundary meanders: (wavelength, amplitude)
# True glomeruli and decoys keep this far (plus their radius) from the cortex/medulla boundary, so a
# 512-px window at level 1 (256 um) around either never sees the other region.
CONTEXT_CLEARANCE_UM = 140.0
GLOMERULUS_GAP_UM = 20.0
GLOMERULUS_AREA_FRACTION = (0.04, 0.1)  # of the usable cortex (or medulla), per slide
# Randomly placed objects sit this far (plus their radius) inside the tissue outline, so the
# 256-um window around any of them is all tissue and decoys differ from glomeruli only in context.
TISSUE_EDGE_MARGIN_UM = 140.0
PLANTED_AREA_MAX = 0.08  # planted glomeruli cover at most this fraction of the tissue
PLACEMENT_BATCH = 256  # candidate centres tried at once for one object
PLACEMENT_BATCHES = 4
PLACEMENT_MISSES_MAX = 8  # objects in a row that found no place: the region is full
# Tissue outline roughness: (cell um, amplitude um) octaves on top of the slide-sized envelope.
TISSUE_OCTAVES_UM = ((400.0, 75.0), (100.0, 15.0), (25.0, 4.0))
TISSUE_BUMP_SCALE = 1.5  # every object sits inside tissue at least this many radii wide
TISSUE_BUMP_PAD_PX = 100.0
OUTLINE_AMPLITUDE_MAX = 0.12  # capsule outline harmonics: 0 = round, 0.12 = clearly lobulated
MAX_RADIUS_FACTOR = 1.0 + OUTLINE_AMPLITUDE_MAX


@dataclass(frozen=True)
class Stain:
    """Beer-Lambert stain model: pixel = glass * exp(-(c_h * od_h + c_pas * od_pas))."""

    od_h: np.ndarray  # optical density of haematoxylin (nuclei) per unit concentration, RGB
    od_pas: np.ndarray  # optical density of PAS (magenta) per unit concentration, RGB
    glass: np.ndarray  # RGB of empty glass, 0..255


@dataclass(frozen=True)
class Objects:
    """Glomerulus-like objects. Outline: r(phi) = radius * (1 + sum amp_k cos(k phi + phase_k))."""

    cx: np.ndarray  # level-0 px (continuous; pixel i spans [i, i + 1))
    cy: np.ndarray
    radius: np.ndarray  # level-0 px, nominal (diameter = 2 * radius * mpp um)
    label: np.ndarray  # 1 = glomerulus (mask foreground), 0 = context decoy
    outline: np.ndarray  # (n, K, 3): harmonic order k, amplitude, phase of the capsule outline
    tuft: np.ndarray  # (n, K, 3): harmonics of the tuft outline, relative to the capsule outline
    tuft_scale: np.ndarray  # tuft radius / capsule radius before harmonics
    tint: np.ndarray  # per-object stain intensity factor
    planted: tuple[str, ...]  # "" for randomly placed objects, else where it was planted

    def __len__(self) -> int:
        return len(self.cx)

    @property
    def max_radius(self) -> np.ndarray:
        return self.radius * (1.0 + np.abs(self.outline[:, :, 1]).sum(axis=1))

    @property
    def reach(self) -> np.ndarray:
        """Level-0 distance within which an object changes pixels (its tissue bump included)."""
        return TISSUE_BUMP_SCALE * self.max_radius + TISSUE_BUMP_PAD_PX


class ObjectIndex:
    """Grid buckets of INDEX_BUCKET_PX: which objects can touch a level-0 box."""

    def __init__(self, objects: Objects, bucket_px: int = INDEX_BUCKET_PX):
        self.bucket_px = bucket_px
        self._cx, self._cy, self._reach = objects.cx, objects.cy, objects.reach
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, (cx, cy, reach) in enumerate(zip(self._cx, self._cy, self._reach, strict=True)):
            for by in range(int((cy - reach) // bucket_px), int((cy + reach) // bucket_px) + 1):
                for bx in range(int((cx - reach) // bucket_px), int((cx + reach) // bucket_px) + 1):
                    buckets.setdefault((by, bx), []).append(i)
        self._buckets = {k: np.asarray(v, np.int64) for k, v in buckets.items()}

    def query(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Indices of objects whose reach overlaps the level-0 box [x0, x1) x [y0, y1), sorted."""
        b = self.bucket_px
        found = [
            self._buckets[(by, bx)]
            for by in range(int(y0 // b), int((y1 - 1e-9) // b) + 1)
            for bx in range(int(x0 // b), int((x1 - 1e-9) // b) + 1)
            if (by, bx) in self._buckets
        ]
        if not found:
            return np.zeros(0, np.int64)
        ids = np.unique(np.concatenate(found))
        cx, cy, reach = self._cx[ids], self._cy[ids], self._reach[ids]
        return ids[(cx + reach > x0) & (cx - reach < x1) & (cy + reach > y0) & (cy - reach < y1)]


@dataclass
class Scene:
    """Continuous geometry of one slide. Fields take level-0 coordinates (broadcastable arrays)."""

    seed: int
    stain_seed: int  # the seed whose slide's stain this one takes (its own, unless asked otherwise)
    width: int
    height: int
    mpp: float
    decoys: bool
    stain: Stain
    # Tissue: signed, roughly distance-like field (level-0 px) from an ellipse plus noise octaves.
    envelope_centre: tuple[float, float]
    envelope_axes: tuple[float, float]
    envelope_angle: float
    tissue_octaves: list[tuple[float, float]]  # (cell px, amplitude px)
    # Orientation of tubule cross-sections: cortex turns smoothly, medulla is one direction.
    cortex_angle: float
    cortex_turn: tuple[float, float]  # turning rate (rad per level-0 px) along x and along y
    cortex_waves: np.ndarray  # (n, 4): direction, wavelength px, amplitude rad, phase
    medulla_angle: float
    medulla_normal: tuple[float, float]
    medulla_offset: float  # medulla is where x * nx + y * ny + wave > offset
    tubule_spacing_px: float
    proximal_fraction: float
    objects: Objects = field(repr=False)
    index: ObjectIndex = field(init=False, repr=False)
    # Values derived once per slide by the renderer (stain lookup table, mean colours).
    cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        self.index = ObjectIndex(self.objects)

    def key(self, name: str) -> int:
        return stream_key(self.seed, name)

    # -- tissue ------------------------------------------------------------------------------
    def _envelope(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        (cx, cy), (ax, ay), angle = self.envelope_centre, self.envelope_axes, self.envelope_angle
        dx, dy = x - cx, y - cy
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        return ((1.0 - np.sqrt((u / ax) ** 2 + (v / ay) ** 2)) * min(ax, ay)).astype(np.float32)

    def tissue_grid(self, xs: np.ndarray, ys: np.ndarray, pixel_px: float) -> np.ndarray:
        """Base tissue field on a grid; > 0 is tissue. Octaves finer than ~2 output pixels are dropped."""
        field_ = self._envelope(xs[None, :], ys[:, None])
        return field_ + fbm_grid(xs, ys, self.tissue_octaves, self.key("tissue"), min_cell_px=2.0 * pixel_px)

    def tissue_points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self._envelope(x, y) + fbm_points(x, y, self.tissue_octaves, self.key("tissue"))

    # -- cortex / medulla ----------------------------------------------------------------------
    def medulla_distance(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Signed level-0 distance into the medulla at points (> 0 inside); -inf without decoys."""
        if not self.decoys:
            return np.full(np.broadcast_shapes(np.shape(x), np.shape(y)), -np.inf, np.float32)
        nx, ny = self.medulla_normal
        wavelength_um, amplitude_um = MEDULLA_WAVE_UM
        wave = value_noise_points(x, y, wavelength_um / self.mpp, self.key("medulla"))
        return (x * nx + y * ny + amplitude_um / self.mpp * wave - self.medulla_offset).astype(np.float32)

    def orientation_points(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Tubule orientation (radians, mod pi) at points: cortex field blended into the medulla's."""
        theta = self.cortex_angle + self.cortex_turn[0] * x + self.cortex_turn[1] * y
        theta = np.broadcast_to(theta, np.broadcast_shapes(np.shape(x), np.shape(y))).astype(np.float64)
        for direction, wavelength, amplitude, phase in self.cortex_waves:
            along = x * math.cos(direction) + y * math.sin(direction)
            theta = theta + amplitude * np.sin(2 * math.pi * along / wavelength + phase)
        if not self.decoys:
            return theta
        edge_px = MEDULLA_EDGE_UM / self.mpp
        m = np.clip(self.medulla_distance(x, y) / (2 * edge_px) + 0.5, 0.0, 1.0)
        m = m * m * (3 - 2 * m)
        # Blend doubled angles so that orientations 0 and pi (the same axis) do not average to pi/2.
        c = (1 - m) * np.cos(2 * theta) + m * math.cos(2 * self.medulla_angle)
        s = (1 - m) * np.sin(2 * theta) + m * math.sin(2 * self.medulla_angle)
        return 0.5 * np.arctan2(s, c)

    # -- summaries for the sidecar ---------------------------------------------------------
    def object_records(self, decoy_value: int = 0) -> list[dict]:
        o = self.objects
        return [
            {
                "id": i,
                "label": "glomerulus" if o.label[i] == GLOMERULUS else "decoy",
                "mask_value": 1 if o.label[i] == GLOMERULUS else decoy_value,
                "cx": float(o.cx[i]),
                "cy": float(o.cy[i]),
                "radius": float(o.radius[i]),
                "max_radius": float(o.max_radius[i]),
                "diameter_um": float(2 * o.radius[i] * self.mpp),
                "outline_harmonics": [[int(k), float(a), float(p)] for k, a, p in o.outline[i]],
                "planted": o.planted[i],
            }
            for i in range(len(o))
        ]


# -- building a scene ------------------------------------------------------------------------
