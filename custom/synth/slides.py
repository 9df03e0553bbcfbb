"""Write synthetic kidney slides: `<id>_wsi.tiff`, `<id>_mask.tiff` (KPIs naming) and `<id>_objects.json`.

Both TIFFs are pyramids written tile by tile from the scene (see render.py), so the memory used
does not depend on the slide size; the JSON sidecar lists every object so tests and benchmarks can
check the mask against the geometry it was drawn from.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from custom.errors import ConfigError
from custom.io import write_atomic
from custom.outputs.pyramid import pyramid_shapes, write_pyramid
from custom.synth.layout import build_scene
from custom.synth.render import render_mask, render_rgb
from custom.synth.scene import DECOY, GLOMERULUS, MPP_DEFAULT, Scene

TILE_PX = 256
JPEG_QUALITY = 90
OUTLINE_FORMULA = (
    "r(phi) = radius * (1 + sum(amp * cos(k * phi + phase) for k, amp, phase in outline_harmonics))"
)


@dataclass(frozen=True)
class SlideResult:
    """What one call wrote, and the numbers a person checks first."""

    slide_id: str
    seed: int
    wsi_path: Path
    mask_path: Path
    objects_path: Path
    level_shapes: list[tuple[int, int]]
    n_glomeruli: int
    n_decoys: int
    n_planted: int
    tissue_fraction: float  # tissue pixels / all pixels, level 0
    glomerulus_fraction: float  # glomerulus (mask) pixels / tissue pixels, level 0
    seconds: float

    def summary(self) -> str:
        h, w = self.level_shapes[0]
        decoys = f", {self.n_decoys} decoys" if self.n_decoys else ""
        return (
            f"{self.slide_id}: {w} x {h} px, {len(self.level_shapes)} levels, "
            f"{self.n_glomeruli} glomeruli ({self.n_planted} on tile lines or slide edges){decoys}, "
            f"tissue {self.tissue_fraction:.0%} of slide, glomeruli {self.glomerulus_fraction:.1%} of tissue, "
            f"{self.seconds:.1f} s -> {self.wsi_path}, {self.mask_path.name}, {self.objects_path.name}"
        )


def write_synthetic_slides(
    out_dir: str | os.PathLike,
    count: int = 1,
    width: int = 8192,
    height: int = 6144,
    seed: int = 0,
    glomerulus_um: tuple[float, float] = (60.0, 250.0),
    decoys: bool = False,
    prefix: str = "synth",
    mpp: float = MPP_DEFAULT,
    progress: bool = True,
    decoy_value: int = 0,
    stain_seed: int | None = None,
) -> Iterator[SlideResult]:
    """Write `count` slides (slide i uses seed + i, id `<prefix>_<seed + i>`), yielding each as done.

    `decoy_value` is the decoys' value in the mask: 0 (background, the default) or 2, a class of
    their own for training with a hard-negative class (the slide's pixels are the same either way).
    `stain_seed` gives every slide the stain of slide `stain_seed` (its geometry and mask unchanged).
    """
    _check_args(count, width, height, glomerulus_um, mpp)
    if decoy_value not in (0, 2):
        raise ConfigError(
            f"decoy_value must be 0 (background) or 2 (a class of their own), got {decoy_value}"
        )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{out}: cannot create the output folder ({err.strerror})") from err
    for i in range(count):
        slide_seed = seed + i
        yield write_synthetic_slide(
            out,
            f"{prefix}_{slide_seed}",
            slide_seed,
            width,
            height,
            glomerulus_um,
            decoys,
            mpp,
            progress,
            decoy_value,
            stain_seed,
        )


def write_synthetic_slide(
    out: Path,
    slide_id: str,
    seed: int,
    width: int,
    height: int,
    glomerulus_um: tuple[float, float],
    decoys: bool,
    mpp: float,
    progress: bool,
    decoy_value: int = 0,
    stain_seed: int | None = None,
) -> SlideResult:
    started = time.perf_counter()
    scene = build_scene(
        seed, width, height, mpp=mpp, glomerulus_um=tuple(glomerulus_um), decoys=decoys, stain_seed=stain_seed
    )
    shapes = pyramid_shapes(height, width)
    counts = _Level0Counter()
    wsi_path = out / f"{slide_id}_wsi.tiff"
    mask_path = out / f"{slide_id}_mask.tiff"

    def slide_tiles(level: int, y: int, x: int, h: int, w: int):
        stats = {} if level == 0 else None
        rgb = render_rgb(scene, level, y, x, h, w, stats=stats)
        if stats is not None:
            counts.add("tissue", stats["tissue_px"])
        return rgb

    def mask_tiles(level: int, y: int, x: int, h: int, w: int):
        mask = render_mask(scene, level, y, x, h, w, decoy_value)
        if level == 0:
            counts.add("glomerulus", int(np.count_nonzero(mask == 1)))
        return mask

    decoy_note = f", {decoy_value} = decoy" if decoy_value else ""
    about = f"HoloHisto synthetic kidney slide {slide_id}, seed {seed}, PAS-like, mpp {mpp}"
    write_pyramid(
        wsi_path, shapes, slide_tiles, channels=3, mpp=mpp, compression="jpeg", tile=TILE_PX,
        jpeg_quality=JPEG_QUALITY, description=about, progress=progress and f"{slide_id} slide",
    )  # fmt: skip
    write_pyramid(
        mask_path, shapes, mask_tiles, channels=1, mpp=mpp, compression="lzw", tile=TILE_PX,
        description=f"HoloHisto synthetic glomerulus mask {slide_id} (1 = glomerulus{decoy_note})",
        progress=progress and f"{slide_id} mask",
    )  # fmt: skip
    tissue_fraction = counts["tissue"] / (width * height)
    glomerulus_fraction = counts["glomerulus"] / max(counts["tissue"], 1)
    objects_path = out / f"{slide_id}_objects.json"
    _write_sidecar(objects_path, scene, slide_id, shapes, tissue_fraction, glomerulus_fraction, decoy_value)
    o = scene.objects
    return SlideResult(
        slide_id=slide_id,
        seed=seed,
        wsi_path=wsi_path,
        mask_path=mask_path,
        objects_path=objects_path,
        level_shapes=shapes,
        n_glomeruli=int((o.label == GLOMERULUS).sum()),
        n_decoys=int((o.label == DECOY).sum()),
        n_planted=sum(bool(p) for p in o.planted),
        tissue_fraction=tissue_fraction,
        glomerulus_fraction=glomerulus_fraction,
        seconds=time.perf_counter() - started,
    )


class _Level0Counter:
    """Pixel counts summed over level-0 tiles, which arrive from several threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, name: str, value: int) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + value

    def __getitem__(self, name: str) -> int:
        return self._counts.get(name, 0)


def _write_sidecar(
    path: Path,
    scene: Scene,
    slide_id: str,
    shapes,
    tissue_fraction: float,
    glom_fraction: float,
    decoy_value: int,
):
    sidecar = {
        "slide_id": slide_id,
        "seed": scene.seed,
        "stain_seed": scene.stain_seed,
        "width": scene.width,
        "height": scene.height,
        "mpp": scene.mpp,
        "level_shapes": [list(s) for s in shapes],
        "decoys": scene.decoys,
        "decoy_mask_value": decoy_value,
        "tissue_fraction": tissue_fraction,
        "glomerulus_fraction_in_tissue": glom_fraction,
        "coordinates": "level-0 pixels, pixel i spans [i, i + 1); level L pixel j is sampled at (j + 0.5) * 2**L",
        "outline": OUTLINE_FORMULA + "; mask is 1 where the pixel centre has r <= r(phi) of a glomerulus",
        "medulla": _medulla_record(scene),
        "objects": scene.object_records(decoy_value),
    }
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(sidecar, indent=1)))


def _medulla_record(scene: Scene) -> dict | None:
    if not scene.decoys:
        return None
    return {
        "note": "decoys sit where medulla_distance > 0; cortex glomeruli where it is < 0",
        "normal": list(scene.medulla_normal),
        "offset": scene.medulla_offset,
    }


def _check_args(count, width, height, glomerulus_um, mpp) -> None:
    if int(count) < 1:
        raise ConfigError(f"count must be at least 1, got {count}")
    if int(width) < 256 or int(height) < 256:
        raise ConfigError(f"width and height must be at least 256 px, got {width} x {height}")
    if len(glomerulus_um) != 2 or min(float(d) for d in glomerulus_um) <= 0:
        raise ConfigError(f"glomerulus_um must be positive diameters in micrometres, got {glomerulus_um}")
    if mpp <= 0:
        raise ConfigError(f"mpp must be positive, got {mpp}")
