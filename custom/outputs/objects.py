"""A slide's objects in one pass: each traced object goes to the GeoJSON, the objects CSV, the overlay and the summary's tally.

Nothing is kept per object. Holding them all for four writers grew memory with the object count: on a
speckled 80k x 80k slide (~30,000 objects) their rings, as the Python lists GeoJSON takes, were ~0.8 GB.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from custom.io import atomic_write
from custom.outputs.geojson import TracedObject, to_feature, write_geojson
from custom.outputs.overlay import draw_rings_into, write_png
from custom.outputs.tables import CSV_COLUMNS, ObjectTally, object_row


def write_object_outputs(
    objects: Iterable[TracedObject],
    paths: dict[str, Path],
    mpp: tuple[float, float] | None,
    class_names: dict[int, str],
    thumbnail: np.ndarray,
    thumbnail_scale: float,
) -> ObjectTally:
    """Write `paths["geojson"]`, `paths["objects"]` (CSV) and `paths["overlay"]` (PNG), each atomically.

    `thumbnail_scale`: thumbnail pixels per level-0 pixel. Returns the tally for `slide_summary`.
    If tracing fails part way, neither table is left behind half written.
    """
    tally = ObjectTally(class_names)
    canvas = np.ascontiguousarray(thumbnail[..., :3]).copy()
    with atomic_write(paths["objects"]) as tmp, open(tmp, "w", newline="") as out:
        rows = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        rows.writeheader()

        def features() -> Iterator[dict]:
            for index, obj in enumerate(objects, start=1):
                rows.writerow(object_row(index, obj, mpp, class_names))
                draw_rings_into(canvas, obj.rings, thumbnail_scale)
                tally.add(obj)
                yield to_feature(obj, mpp, class_names, index)

        write_geojson(paths["geojson"], features())
    write_png(paths["overlay"], canvas)
    return tally
