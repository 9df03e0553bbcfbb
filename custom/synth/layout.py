"""Building one slide's scene from its seed: the stain, the tissue and orientation fields, and where
the glomeruli and decoys go (planted on tile lines and slide edges first, then at random).
"""

from __future__ import annotations

import math

import numpy as np

from custom.synth.scene import (
    CONTEXT_CLEARANCE_UM,
    CORTEX_TURN_RAD_PER_MM,
    CORTEX_WOBBLE_RAD_PER_MM,
    DECOY,
    GLOMERULUS,
    GLOMERULUS_AREA_FRACTION,
    GLOMERULUS_GAP_UM,
    MAX_RADIUS_FACTOR,
    MEDULLA_EDGE_UM,
    MPP_DEFAULT,
    ORIENTATION_WAVELENGTH_MM,
    OUTLINE_AMPLITUDE_MAX,
    PLACEMENT_BATCH,
    PLACEMENT_BATCHES,
    PLACEMENT_MISSES_MAX,
    PLANTED_AREA_MAX,
    TISSUE_EDGE_MARGIN_UM,
    TISSUE_OCTAVES_UM,
    TUBULE_SPACING_UM,
    ObjectIndex,
    Objects,
    Scene,
    Stain,
)


def _slide_rng(seed: int) -> np.random.Generator:
    """The random stream of slide `seed`; its first draws are the slide's stain."""
    return np.random.default_rng([seed & 0xFFFFFFFF, 0x6B1D])


def _stain(rng: np.random.Generator) -> Stain:
    od_h = np.array([0.65, 0.70, 0.29]) + rng.uniform(-0.06, 0.06, 3)
    od_pas = np.array([0.22, 0.88, 0.42]) + rng.uniform(-0.08, 0.08, 3)
    od_h = od_h / np.linalg.norm(od_h) * rng.uniform(0.95, 1.3)
    od_pas = od_pas / np.linalg.norm(od_pas) * rng.uniform(0.8, 1.15)
    glass = np.array([243.0, 242.0, 245.0]) + rng.uniform(-4, 4, 3)
    return Stain(
        od_h=od_h.astype(np.float32), od_pas=od_pas.astype(np.float32), glass=glass.astype(np.float32)
    )


def _harmonics(rng: np.random.Generator, orders: range, total_amp: float) -> np.ndarray:
    amps = rng.uniform(0.2, 1.0, len(orders))
    amps *= total_amp / amps.sum()
    return np.stack([np.asarray(orders, float), amps, rng.uniform(0, 2 * math.pi, len(orders))], axis=1)


def _planted_positions(width: int, height: int, rng: np.random.Generator) -> list[tuple[str, float, float]]:
    """Candidate centres on 4096/2048/1024 tile lines and just inside the slide edges, by kind."""
    cands: list[tuple[str, float, float]] = []
    for step, name in ((4096, "tile4096"), (2048, "tile2048"), (1024, "tile1024")):
        xs = [x for x in range(step, width, step) if name == "tile4096" or x % (2 * step)]
        ys = [y for y in range(step, height, step) if name == "tile4096" or y % (2 * step)]
        cands += [(f"{name}_corner", float(x), float(y)) for x in xs for y in ys]
        if name == "tile4096":
            cands += [(f"{name}_edge", float(x), float(rng.uniform(0, height))) for x in xs]
            cands += [(f"{name}_edge", float(rng.uniform(0, width)), float(y)) for y in ys]
    return cands


def build_scene(
    seed: int,
    width: int,
    height: int,
    mpp: float = MPP_DEFAULT,
    glomerulus_um: tuple[float, float] = (60.0, 250.0),
    decoys: bool = False,
    stain_seed: int | None = None,
) -> Scene:
    """All per-slide geometry for `seed`; the same arguments always give the same scene.

    `stain_seed` takes the stain of that seed's slide instead (the geometry stays `seed`'s): the same
    tissue in another slide's stain, to tell a stain shift from anything else.
    """
    rng = _slide_rng(seed)
    stain = _stain(rng)  # drawn whatever stain_seed is, so the geometry never depends on it
    if stain_seed is not None:
        stain = _stain(_slide_rng(stain_seed))
    um = 1.0 / mpp  # level-0 px per micrometre
    # The section runs off the scanned area along one axis (so tissue meets two slide edges, where
    # edge glomeruli are planted) and has glass margins along the other.
    spans = rng.permutation([rng.uniform(1.02, 1.2), rng.uniform(0.75, 0.95)])
    ax, ay = width / 2 * spans[0], height / 2 * spans[1]
    large_cell = 0.45 * min(width, height)
    tissue_octaves = [(large_cell, 0.2 * min(ax, ay))] + [(c * um, a * um) for c, a in TISSUE_OCTAVES_UM]
    n_waves = 3
    wavelengths = rng.uniform(*ORIENTATION_WAVELENGTH_MM, n_waves) * 1000 * um
    # Amplitudes chosen so the RMS turning rate of all waves together is CORTEX_WOBBLE_RAD_PER_MM.
    amps = CORTEX_WOBBLE_RAD_PER_MM / 1000 / um * wavelengths / (2 * math.pi) * math.sqrt(2 / n_waves)
    turn_direction = rng.uniform(0, 2 * math.pi)
    turn_rate = CORTEX_TURN_RAD_PER_MM / 1000 / um  # rad per level-0 px
    cortex_waves = np.stack(
        [rng.uniform(0, math.pi, n_waves), wavelengths, amps, rng.uniform(0, 2 * math.pi, n_waves)], axis=1
    )
    normal_angle = rng.uniform(0, 2 * math.pi)
    normal = (math.cos(normal_angle), math.sin(normal_angle))
    corners = [0.0, width * normal[0], height * normal[1], width * normal[0] + height * normal[1]]
    medulla_offset = min(corners) + rng.uniform(0.5, 0.6) * (max(corners) - min(corners))
    scene = Scene(
        seed=seed,
        stain_seed=seed if stain_seed is None else stain_seed,
        width=width,
        height=height,
        mpp=mpp,
        decoys=decoys,
        stain=stain,
        envelope_centre=(width / 2 * rng.uniform(0.9, 1.1), height / 2 * rng.uniform(0.9, 1.1)),
        envelope_axes=(ax, ay),
        envelope_angle=rng.uniform(-0.3, 0.3),
        tissue_octaves=tissue_octaves,
        cortex_angle=rng.uniform(0, math.pi),
        cortex_turn=(turn_rate * math.cos(turn_direction), turn_rate * math.sin(turn_direction)),
        cortex_waves=cortex_waves,
        medulla_angle=rng.uniform(0, math.pi),
        medulla_normal=normal,
        medulla_offset=medulla_offset,
        tubule_spacing_px=rng.uniform(*TUBULE_SPACING_UM) * um,
        proximal_fraction=rng.uniform(0.55, 0.75),
        objects=_empty_objects(),
    )
    scene.objects = _place_objects(scene, rng, glomerulus_um)
    scene.index = ObjectIndex(scene.objects)
    return scene


def _empty_objects() -> Objects:
    z = np.zeros(0)
    return Objects(z, z, z, z.astype(np.int8), np.zeros((0, 4, 3)), np.zeros((0, 5, 3)), z, z, ())


def _place_objects(scene: Scene, rng: np.random.Generator, glomerulus_um: tuple[float, float]) -> Objects:
    """Planted glomeruli first (tile lines, slide edges), then random ones up to an area fraction."""
    um = 1.0 / scene.mpp
    r_min, r_max = (d / 2 * um for d in sorted(glomerulus_um))
    width, height = scene.width, scene.height
    gap_px = GLOMERULUS_GAP_UM * um
    clearance_px = (CONTEXT_CLEARANCE_UM + MEDULLA_EDGE_UM) * um
    placed: list[dict] = []
    centres = np.zeros((0, 3))  # cx, cy, bound on the outline radius of every placed object

    def fits(cx: float, cy: float, radius: float) -> bool:
        d = np.hypot(centres[:, 0] - cx, centres[:, 1] - cy)
        return bool(np.all(d >= centres[:, 2] + radius * MAX_RADIUS_FACTOR + gap_px))

    def region_ok(cx, cy, radius, label):
        d = scene.medulla_distance(np.asarray(cx, float), np.asarray(cy, float))
        need = radius * MAX_RADIUS_FACTOR + clearance_px
        return np.where(label == DECOY, d >= need, d <= -need)

    def add(cx: float, cy: float, radius: float, label: int, planted: str) -> None:
        nonlocal centres
        placed.append(
            {
                "cx": cx,
                "cy": cy,
                "radius": radius,
                "label": label,
                "outline": _harmonics(rng, range(2, 6), rng.uniform(0.0, OUTLINE_AMPLITUDE_MAX)),
                "tuft": _harmonics(rng, range(3, 8), rng.uniform(0.06, 0.22)),
                "tuft_scale": rng.uniform(0.8, 0.88),
                "tint": rng.uniform(0.9, 1.1),
                "planted": planted,
            }
        )
        centres = np.vstack([centres, [cx, cy, radius * MAX_RADIUS_FACTOR]])

    # Sample the base tissue field coarsely to measure the usable cortex and medulla: where an
    # object of mean size meets the placement rules. Goals are area fractions of these, so the
    # density of objects around decoys and around glomeruli is the same.
    step = max(width, height) / 256
    gx = (np.arange(math.ceil(width / step)) + 0.5) * step
    gy = (np.arange(math.ceil(height / step)) + 0.5) * step
    mean_bound = (r_min + r_max) / 2 * MAX_RADIUS_FACTOR
    tissue_depth = scene.tissue_points(gx[None, :], gy[:, None])
    tissue_sample = tissue_depth > 0
    deep = tissue_depth >= mean_bound + TISSUE_EDGE_MARGIN_UM * um
    medulla_depth = scene.medulla_distance(gx[None, :], gy[:, None])
    usable = {
        GLOMERULUS: deep & (medulla_depth <= -(mean_bound + clearance_px)),
        DECOY: deep & (medulla_depth >= mean_bound + clearance_px),
    }
    area_fraction = rng.uniform(*GLOMERULUS_AREA_FRACTION)
    goal = {label: area_fraction * float(usable[label].sum()) * step * step for label in usable}

    def in_usable(o: dict) -> bool:
        i, j = min(int(o["cy"] // step), len(gy) - 1), min(int(o["cx"] // step), len(gx) - 1)
        return bool(usable[o["label"]][i, j])

    # Planted: a centre exactly on each kind of tile line, and some cut by the slide edge. The
    # options deepest in tissue come first, so planting rarely has to grow tissue around them.
    by_kind: dict[str, list[tuple[float, float]]] = {}
    for kind, x, y in _planted_positions(width, height, rng):
        by_kind.setdefault(kind, []).append((x, y))
    plans: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}  # kind -> radius, option xs, ys
    for kind in ("tile4096_corner", "tile4096_edge", "tile2048_corner", "tile1024_corner"):
        options = np.array(by_kind.get(kind, []), float).reshape(-1, 2)
        plans[kind] = (rng.uniform(r_min, r_max), options[:, 0], options[:, 1])
    edge_sides = []
    for side in ("left", "right", "top", "bottom"):
        radius = rng.uniform(r_min, r_max)
        inset = rng.uniform(0.0, 0.6) * radius  # centre this far inside the edge: always cut
        vertical = side in ("left", "right")
        along = np.linspace(0.1, 0.9, 33) * (height if vertical else width)
        fixed = np.full_like(
            along, {"left": inset, "right": width - inset, "top": inset, "bottom": height - inset}[side]
        )
        xs, ys = (fixed, along) if vertical else (along, fixed)
        edge_sides.append((float(scene.tissue_points(xs, ys).max()), f"slide_edge_{side}", (radius, xs, ys)))
    # The two sides where tissue reaches deepest to the edge (a third if tissue meets it too).
    edge_sides.sort(key=lambda e: -e[0])
    for rank, (reach, kind, plan) in enumerate(edge_sides[:3]):
        if rank < 2 or reach > 0:
            plans[kind] = plan
    priority = ["tile4096_corner", "tile4096_edge", edge_sides[0][1], edge_sides[1][1]]
    priority += [k for k in ("tile2048_corner", "tile1024_corner", edge_sides[2][1]) if k in plans]
    # On small slides a handful of big glomeruli would crowd out everything else.
    planted_area_max = PLANTED_AREA_MAX * float(tissue_sample.sum()) * step * step
    planted_area = 0.0
    for kind in priority:
        radius, xs, ys = plans[kind]
        if planted_area + math.pi * radius**2 > planted_area_max:
            if planted_area > 0:
                continue
            # The first one is always planted, small enough: even a tiny slide shows a glomerulus.
            radius = max(r_min, math.sqrt(planted_area_max / math.pi))
        for i in np.argsort(-scene.tissue_points(xs, ys), kind="stable")[:8]:
            if region_ok(xs[i], ys[i], radius, GLOMERULUS) and fits(xs[i], ys[i], radius):
                add(float(xs[i]), float(ys[i]), radius, GLOMERULUS, kind)
                planted_area += math.pi * radius**2
                break
    # Planted objects inside the usable area count towards its density; the others are extra.
    goal[GLOMERULUS] -= sum(math.pi * p["radius"] ** 2 for p in placed if in_usable(p))

    # Random glomeruli in cortex (and decoys in medulla), each until it reaches the area fraction.
    # The size is drawn first and then a place is searched for it, so that crowded or small regions
    # do not bias the sizes (decoys must match glomeruli in everything but their context).
    margin_px = TISSUE_EDGE_MARGIN_UM * um
    for label in (GLOMERULUS, DECOY):
        misses = 0
        while goal[label] > 0 and misses < PLACEMENT_MISSES_MAX:
            radius = rng.uniform(r_min, r_max)
            bound = radius * MAX_RADIUS_FACTOR
            for _ in range(PLACEMENT_BATCHES):
                xs = rng.uniform(bound, max(bound, width - bound), PLACEMENT_BATCH)
                ys = rng.uniform(bound, max(bound, height - bound), PLACEMENT_BATCH)
                ok = (scene.tissue_points(xs, ys) >= bound + margin_px) & region_ok(xs, ys, radius, label)
                spot = next((i for i in np.flatnonzero(ok) if fits(xs[i], ys[i], radius)), None)
                if spot is not None:
                    add(float(xs[spot]), float(ys[spot]), radius, label, "")
                    goal[label] -= math.pi * radius**2
                    misses = 0
                    break
            else:
                misses += 1

    return Objects(
        cx=np.array([p["cx"] for p in placed], float),
        cy=np.array([p["cy"] for p in placed], float),
        radius=np.array([p["radius"] for p in placed], float),
        label=np.array([p["label"] for p in placed], np.int8),
        outline=np.array([p["outline"] for p in placed], float).reshape(-1, 4, 3),
        tuft=np.array([p["tuft"] for p in placed], float).reshape(-1, 5, 3),
        tuft_scale=np.array([p["tuft_scale"] for p in placed], float),
        tint=np.array([p["tint"] for p in placed], float),
        planted=tuple(p["planted"] for p in placed),
    )
