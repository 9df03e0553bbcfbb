"""Predicted objects as GeoJSON polygons that QuPath imports (File > Import objects).

One Feature per connected object, outer ring plus holes, in level-0 pixel coordinates (x right,
y down, pixel i spanning [i, i + 1)), with its class and area in um^2.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

DEFAULT_COLOURS = [(0, 200, 0), (220, 40, 40), (40, 90, 230), (230, 160, 0), (160, 0, 200)]


def mask_to_features(
    labels: np.ndarray,
    scale: float = 1.0,
    mpp: tuple[float, float] | None = None,
    class_names: dict[int, str] | None = None,
) -> list[dict]:
    """Features for every object of every class > 0 in a label map.

    `labels` may be a coarser level of the slide: `scale` is level-0 pixels per label pixel.
    Vertices are boundary pixel centres, so rasterising a ring back at the same level gives the
    object's pixels.
    """
    return list(iter_features(labels, scale, mpp, class_names))


def iter_features(
    labels: np.ndarray,
    scale: float = 1.0,
    mpp: tuple[float, float] | None = None,
    class_names: dict[int, str] | None = None,
) -> Iterator[dict]:
    """`mask_to_features` one feature at a time, so writing them never holds them all."""
    class_names = class_names or {}
    count = 0
    for cls in (int(c) for c in np.unique(labels) if c > 0):
        binary = (labels == cls).astype(np.uint8)
        _, components, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
        contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        if hierarchy is None:
            continue
        hierarchy = hierarchy[0]
        name = class_names.get(cls, f"class {cls}")
        colour = list(DEFAULT_COLOURS[(cls - 1) % len(DEFAULT_COLOURS)])
        for i, contour in enumerate(contours):
            if hierarchy[i][3] != -1:
                continue  # a hole: emitted with its outer ring below
            rings = [_ring(contour, scale)]
            child = hierarchy[i][2]
            while child != -1:
                rings.append(_ring(contours[child], scale))
                child = hierarchy[child][0]
            x, y = contour[0, 0]
            area_px0 = float(stats[components[y, x], cv2.CC_STAT_AREA]) * scale * scale
            area_um2 = area_px0 * mpp[0] * mpp[1] if mpp else None
            count += 1
            yield (
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": rings},
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": name, "color": colour},
                        "name": f"{name} {count}",
                        "area_um2": area_um2,
                        "area_px": area_px0,
                        "measurements": {"Area um^2": area_um2} if area_um2 is not None else {},
                    },
                }
            )


def write_geojson(path: str | Path, features: Iterable[dict]) -> int:
    """Write a FeatureCollection atomically (temporary name, then rename); returns the feature count.

    Features are written as they come, so a slide with very many objects never holds their JSON at once.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(tmp, "w") as out:
            out.write('{"type": "FeatureCollection", "features": [')
            for feature in features:
                out.write((",\n" if count else "\n") + json.dumps(feature))
                count += 1
            out.write("\n]}\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def rasterise_features(features: list[dict], shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """Label map (class index by feature order of classes seen) of features at a level `scale`.

    Inverse of `mask_to_features` for checking round trips; class ids come from the feature name
    order, so it is meant for one-class maps or for comparing foreground.
    """
    out = np.zeros(shape, np.uint8)
    names: dict[str, int] = {}
    for feature in features:
        name = feature["properties"]["classification"]["name"]
        cls = names.setdefault(name, len(names) + 1)
        outer, *holes = feature["geometry"]["coordinates"]
        cv2.fillPoly(out, [_pixels(outer, scale)], cls)
        for hole in holes:
            # a hole ring runs through the object's own pixels around the hole: clear inside, keep the ring
            cv2.fillPoly(out, [_pixels(hole, scale)], 0)
            cv2.polylines(out, [_pixels(hole, scale)], True, cls, 1)
    return out


def _ring(contour: np.ndarray, scale: float) -> list[list[float]]:
    pts = (contour[:, 0, :].astype(np.float64) + 0.5) * scale
    ring = [[round(float(x), 2), round(float(y), 2)] for x, y in pts]
    if len(ring) < 3:  # a 1-2 pixel object: a tiny square around it keeps the polygon valid
        (x, y), h = ring[0], 0.5 * scale
        ring = [[x - h, y - h], [x + h, y - h], [x + h, y + h], [x - h, y + h]]
    return [*ring, ring[0]]  # GeoJSON rings are closed


def _pixels(ring, scale: float) -> np.ndarray:
    pts = np.asarray(ring, dtype=np.float64) / scale - 0.5
    return np.round(pts).astype(np.int32).reshape(-1, 1, 2)
