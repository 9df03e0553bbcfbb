"""Per-object and per-slide tables beside each slide's mask: what a pathologist counts and measures.

`<stem>_objects.csv`: one row per object (id, class, centroid and box in level-0 pixels, area,
equivalent diameter and perimeter in um). `<stem>_summary.json`: the slide's object count per
class, glomeruli per mm2 of tissue, the tissue area, and how the mask was made.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from custom.io import atomic_write
from custom.outputs.geojson import TracedObject

CSV_COLUMNS = (
    "id",
    "class",
    "centroid_x_px",
    "centroid_y_px",
    "area_um2",
    "equivalent_diameter_um",
    "perimeter_um",
    "box_x_px",
    "box_y_px",
    "box_width_px",
    "box_height_px",
)
GLOMERULUS_CLASS = 1  # the KPIs masks' foreground value


def object_row(index: int, obj: TracedObject, mpp: tuple[float, float] | None, class_names: dict[int, str]):
    """The CSV row of object number `index` (1-based, as the GeoJSON names it)."""
    area_um2 = obj.area_px * mpp[0] * mpp[1] if mpp else None
    return {
        "id": index,
        "class": class_names.get(obj.cls, f"class {obj.cls}"),
        "centroid_x_px": round(obj.centroid[0], 1),
        "centroid_y_px": round(obj.centroid[1], 1),
        "area_um2": round(area_um2, 2) if area_um2 is not None else "",
        "equivalent_diameter_um": round(2 * math.sqrt(area_um2 / math.pi), 2) if area_um2 is not None else "",
        "perimeter_um": round(obj.perimeter_px * mpp[1], 1) if mpp else "",
        "box_x_px": round(obj.box[0]),
        "box_y_px": round(obj.box[1]),
        "box_width_px": round(obj.box[2]),
        "box_height_px": round(obj.box[3]),
    }


@dataclass
class ObjectTally:
    """What the summary needs of a slide's objects, added up one object at a time (none is kept)."""

    class_names: dict[int, str]
    counts: Counter = field(default_factory=Counter)
    glomeruli: int = 0
    area_px: float = 0.0

    def add(self, obj: TracedObject) -> None:
        self.counts[self.class_names.get(obj.cls, f"class {obj.cls}")] += 1
        self.glomeruli += obj.cls == GLOMERULUS_CLASS
        self.area_px += obj.area_px

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def slide_summary(
    slide: str,
    tally: ObjectTally,
    tissue_fraction: float,
    shape0: tuple[int, int],
    mpp: tuple[float, float] | None,
    **settings,
) -> dict:
    """The per-slide figures: counts per class, glomeruli per mm2 of tissue, tissue area in mm2."""
    tissue_mm2 = tissue_fraction * shape0[0] * shape0[1] * mpp[0] * mpp[1] / 1e6 if mpp else None
    return {
        "slide": slide,
        "object_count": tally.total,
        "counts": dict(sorted(tally.counts.items())),
        "glomerulus_count": tally.glomeruli,
        "glomeruli_per_mm2_tissue": tally.glomeruli / tissue_mm2 if tissue_mm2 else None,
        "tissue_area_mm2": tissue_mm2,
        "tissue_fraction": tissue_fraction,
        "mean_area_um2": tally.area_px / tally.total * mpp[0] * mpp[1] if tally.total and mpp else None,
        "height_px": shape0[0],
        "width_px": shape0[1],
        "mpp_um": list(mpp) if mpp else None,
        **settings,
    }


def write_json(path: str | Path, record: dict) -> Path:
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n")
    return Path(path)
