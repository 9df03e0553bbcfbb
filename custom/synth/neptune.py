"""A synthetic multi-class stand-in for NEPTUNE-style data: 3000 x 3000 ROIs with six-class label maps.

The HoloHisto paper's NEPTUNE table scores several kidney structures per class on 3000 x 3000 ROIs.
This stand-in draws its ROIs from the same synthetic scenes as the slides, cropped from the middle
of a larger section around a glomerulus (so they are nearly all tissue), and labels every pixel
with the structure the renderer painted there, from the same geometry and the same sampled fields:

    1 tuft, 2 capsule (Bowman's capsule and space), 3 proximal tubule, 4 distal tubule,
    5 tubule lumen, 6 interstitium (the periglomerular rim included); 0 glass

These are the renderer's structures, not NEPTUNE's own six (it has no arteries or peritubular
capillaries): the stand-in exercises multi-class loading, training and per-class scoring, nothing
about real tissue. Files use the slide naming (`roi_<seed>_wsi.tiff`, `roi_<seed>_mask.tiff`,
pyramidal, 0.25 um/px) so `segment` and `evaluate` pair them; `neptune.json` lists them with
their class names under "labels".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from custom.errors import ConfigError
from custom.io import write_atomic
from custom.outputs.pyramid import pyramid_shapes, write_pyramid
from custom.synth.glomeruli import object_window, radii_at
from custom.synth.layout import build_scene
from custom.synth.paint import CoarseGrid, level_coords
from custom.synth.render import render_rgb
from custom.synth.scene import GLOMERULUS, MPP_DEFAULT
from custom.synth.tubules import INTERSTITIUM_HALF_UM, inward_px, tubule_fields

ROI_PX = 3000
SECTION_FACTOR = 3  # the scene is this many ROIs wide, so the ROI in its middle is inside the tissue
ORIGIN_ALIGN_PX = 256  # ROI origins on this grid keep every pyramid level on the scene's pixel grid
GLOMERULUS_UM = (100.0, 200.0)  # human glomeruli, as in NEPTUNE
TUFT, CAPSULE, PROXIMAL, DISTAL, LUMEN, INTERSTITIUM = range(1, 7)
CLASS_NAMES = {
    TUFT: "tuft",
    CAPSULE: "capsule",
    PROXIMAL: "proximal tubule",
    DISTAL: "distal tubule",
    LUMEN: "tubule lumen",
    INTERSTITIUM: "interstitium",
}
NUM_CLASSES = len(CLASS_NAMES) + 1  # with background
PERIGLOMERULAR_RIM_UM = 4.0  # as painted in glomeruli.py


def render_labels(scene, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
    """Class of every pixel of a level-L region: the fields the renderer samples, thresholded."""
    xs, ys, ds = level_coords(level, y, x, h, w)
    um = 1.0 / scene.mpp
    grid = CoarseGrid(level, y, x, h, w)
    f = tubule_fields(scene, grid.xs[None, :], grid.ys[:, None], dtype=np.float32)
    inward, from_lumen = inward_px(scene, f)
    coarse = np.stack([scene.tissue_grid(grid.xs, grid.ys, ds), inward, from_lumen, f["proximal"]])
    tissue, inward, from_lumen, proximal = grid.upsample(coarse.astype(np.float32))
    labels = np.full((h, w), INTERSTITIUM, np.uint8)
    tubule = inward >= INTERSTITIUM_HALF_UM * um
    labels[tubule] = np.where(
        from_lumen[tubule] < 0, LUMEN, np.where(proximal[tubule] >= 0.5, PROXIMAL, DISTAL)
    )
    labels[tissue < 0] = 0
    o = scene.objects
    for j in scene.index.query(x * ds, y * ds, (x + w) * ds, (y + h) * ds):
        if o.label[j] != GLOMERULUS:
            continue
        rim = PERIGLOMERULAR_RIM_UM * um
        win = object_window(scene, j, xs, ys, o.max_radius[j] + rim)
        if win is None:
            continue
        rows, cols = win
        dx, dy = xs[cols][None, :] - o.cx[j], ys[rows][:, None] - o.cy[j]
        capsule_r, tuft_r = radii_at(scene, j, np.arctan2(dy, dx))
        r = np.hypot(dx, dy)
        sub = labels[rows, cols]
        sub[r <= capsule_r + rim] = INTERSTITIUM
        sub[r <= capsule_r] = CAPSULE
        sub[r <= tuft_r] = TUFT
    return labels


def write_neptune_rois(
    out_dir: str | os.PathLike, count: int = 2, seed: int = 0, side: int = ROI_PX, mpp: float = MPP_DEFAULT
) -> Path:
    """Write `count` ROIs (ROI i uses seed + i) and `neptune.json`; returns the datalist's path."""
    if int(count) < 1 or int(side) < 256:
        raise ConfigError(f"need at least one ROI of at least 256 px, got count {count}, side {side}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(int(count)):
        roi_seed = seed + i
        rid = f"roi_{roi_seed}"
        scene = build_scene(roi_seed, side * SECTION_FACTOR, side * SECTION_FACTOR, mpp, GLOMERULUS_UM)
        oy, ox = _origin(scene, side)
        shapes = pyramid_shapes(side, side)

        def region(render, level, y, x, h, w, scene=scene, oy=oy, ox=ox):
            return render(scene, level, y + oy // 2**level, x + ox // 2**level, h, w)

        about = f"HoloHisto synthetic NEPTUNE-style ROI {rid}, seed {roi_seed}, mpp {mpp}"
        write_pyramid(
            out / f"{rid}_wsi.tiff", shapes, lambda *r: region(render_rgb, *r), channels=3, mpp=mpp,
            compression="jpeg", description=about,
        )  # fmt: skip
        write_pyramid(
            out / f"{rid}_mask.tiff", shapes, lambda *r: region(render_labels, *r), channels=1, mpp=mpp,
            compression="lzw", description=f"{about}: labels {CLASS_NAMES}",
        )  # fmt: skip
        items.append({"image": f"{rid}_wsi.tiff", "label": f"{rid}_mask.tiff"})
    content = {
        "labels": {str(k): v for k, v in CLASS_NAMES.items()},
        "num_classes": NUM_CLASSES,
        "rois": items,
    }
    return write_atomic(
        out / "neptune.json", lambda tmp: tmp.write_text(json.dumps(content, indent=1) + "\n")
    )


def _origin(scene, side: int) -> tuple[int, int]:
    """Top-left of an ROI at least half an ROI inside the section, centred on a glomerulus if it can be."""
    align = ORIGIN_ALIGN_PX
    lo = -(-(side // 2) // align) * align
    hi = (scene.width - side - side // 2) // align * align
    o = scene.objects
    centres = [(o.cy[j], o.cx[j]) for j in range(len(o)) if o.label[j] == GLOMERULUS]
    inside = [(cy, cx) for cy, cx in centres if all(lo <= c - side / 2 <= hi for c in (cy, cx))]
    cy, cx = inside[0] if inside else (scene.height / 2, scene.width / 2)
    return tuple(int(np.clip(round((c - side / 2) / align) * align, lo, hi)) for c in (cy, cx))
