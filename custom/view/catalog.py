"""What the viewer serves: each `<stem>_pred.tiff` of an output folder with its slide, truth and figures.

Pairing: OUT_DIR/<stem>_pred.tiff is the prediction; the slide is a file `<stem>.<ext>` (or a DICOM
folder `<stem>/`) found anywhere under the slides folder; the ground truth is `<id>_mask.tiff`
beside the slide (KPIs naming: slide `<id>_wsi.tiff`). GeoJSON and `<stem>_summary.json` sit beside
the prediction; an evaluation report's metrics.json comes from `--report` or from under OUT_DIR.

Only files under the folders the viewer was given are ever opened: a symlink that leads out of them
is left out as if it were not there. Files open on first use; one that fails to open gives its
entry a one-line `error` that the page shows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from custom.data.datalists import MASK_SUFFIX, SLIDE_EXTENSIONS, _stem, slide_id
from custom.errors import ConfigError
from custom.view.dzi import DziImage
from custom.wsi.reader import open_mask, open_slide

log = logging.getLogger(__name__)

PRED_SUFFIX = "_pred"
LABEL_EXTENSIONS = (".tiff", ".tif")
METRICS_FILE = "metrics.json"
SUMMARY_SUFFIX = "_summary.json"
NOT_SLIDES = (PRED_SUFFIX, MASK_SUFFIX, "_prob")  # label maps beside slides are never the slide


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, with every link followed, lies under the (resolved) folder `root`."""
    try:
        path.resolve().relative_to(root)
    except (ValueError, OSError):
        return False
    return True


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


@dataclass
class SlideEntry:
    """One slide as the page shows it."""

    name: str  # the prediction's stem, which names the slide in every URL
    pred: Path
    slide: Path | None = None
    truth: Path | None = None
    geojson: Path | None = None
    summary: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    images: dict[str, DziImage] = field(default_factory=dict)
    object_count: int | None = None
    mpp: float | None = None
    _opened: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def open(self) -> SlideEntry:
        """Open the prediction, slide and truth once; a failure becomes `error`, never an exception."""
        with self._lock:
            if not self._opened:
                self._opened = True
                try:
                    self._open_images()
                except Exception as err:  # any file that will not open is shown, not raised
                    self.error = one_line(err)
                    self.images.clear()
                count = self.summary.get("glomerulus_count")
                self.object_count = count if isinstance(count, int) else self._count_features()
        return self

    def _open_images(self) -> None:
        mask = open_mask(self.pred)
        self.images["mask"] = DziImage(mask, "mask")
        shape = tuple(mask.level_shapes[0])
        self.mpp = mask.mpp[1] if mask.mpp else None
        if self.slide is not None:
            slide = open_slide(self.slide)
            if tuple(slide.level_shapes[0]) != shape:
                raise ConfigError(
                    f"{self.pred}: the prediction is {shape[0]} x {shape[1]} px but its slide "
                    f"{self.slide.name} is {slide.level_shapes[0][0]} x {slide.level_shapes[0][1]} px"
                )
            self.images["slide"] = DziImage(slide, "slide")
            self.mpp = slide.mpp[1] if slide.mpp else self.mpp
        if self.truth is not None:
            try:
                truth = open_mask(self.truth)
            except Exception as err:
                self.notes.append(f"ground truth not shown: {one_line(err)}")
                return
            if tuple(truth.level_shapes[0]) != shape:
                self.notes.append(f"ground truth not shown: {self.truth.name} is not the slide's size")
            else:
                self.images["truth"] = DziImage(truth, "outline")

    def _count_features(self) -> int | None:
        if self.geojson is None:
            return None
        try:
            return len(json.loads(self.geojson.read_text())["features"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            self.notes.append(f"{self.geojson.name}: not a readable FeatureCollection ({one_line(err)})")
            self.geojson = None
            return None

    def figures(self) -> dict:
        """The slide list's figures; None where no report or summary gives one."""
        return {
            "wsi_dice": _number(self.evaluation.get("wsi_dice")),
            "object_count": _number(self.object_count),
            "glomeruli_per_mm2": _number(self.summary.get("glomeruli_per_mm2_tissue")),
        }


class Catalog:
    """Every slide of an output folder, by name, and the folders the server may read."""

    def __init__(
        self, out_dir: str | Path, slides_dir: str | Path | None = None, report: str | Path | None = None
    ):
        self.out_dir = _folder(out_dir, "output")
        self.slides_dir = _folder(slides_dir, "slides") if slides_dir is not None else self.out_dir
        self.entries: dict[str, SlideEntry] = {}
        for pred in sorted(self.out_dir.iterdir()):
            name = _stem(pred)
            if not (name.endswith(PRED_SUFFIX) and pred.suffix.lower() in LABEL_EXTENSIONS):
                continue
            if not inside(pred, self.out_dir):
                log.warning("%s: a link out of %s; not served", pred, self.out_dir)
                continue
            stem = name[: -len(PRED_SUFFIX)]
            self.entries[stem] = SlideEntry(stem, pred, geojson=self._beside(f"{stem}.geojson"))
        if not self.entries:
            raise ConfigError(f"{self.out_dir}: no <stem>{PRED_SUFFIX}.tiff predictions found")
        self._pair_slides()
        self._read_summaries()
        self._read_report(report)

    def _beside(self, filename: str) -> Path | None:
        path = self.out_dir / filename
        return path if path.is_file() and inside(path, self.out_dir) else None

    def _pair_slides(self) -> None:
        found: dict[str, list[Path]] = {}
        # Links to folders are not followed, so the walk never leaves the slides folder.
        for dirpath, dirnames, filenames in os.walk(self.slides_dir):
            dirnames.sort()
            folder = Path(dirpath)
            for name in dirnames:
                if name in self.entries and _dicom_folder(folder / name, self.slides_dir):
                    found.setdefault(name, []).append(folder / name)
            for name in sorted(filenames):
                path = folder / name
                stem = _stem(path)
                if (
                    stem in self.entries
                    and name.lower().endswith(SLIDE_EXTENSIONS)
                    and not stem.endswith(NOT_SLIDES)
                ):
                    found.setdefault(stem, []).append(path)
        for stem, entry in self.entries.items():
            candidates = [p for p in found.get(stem, []) if inside(p, self.slides_dir)]
            if not candidates:
                entry.notes.append(
                    f"slide {stem}.* not found under {self.slides_dir}: the mask is shown alone"
                )
                continue
            entry.slide = min(candidates, key=lambda p: (len(p.parts), str(p)))
            if len(candidates) > 1:
                entry.notes.append(f"{len(candidates)} slides named {stem}; showing {entry.slide}")
            sid = slide_id(entry.slide)
            for ext in LABEL_EXTENSIONS:
                truth = entry.slide.with_name(f"{sid}{MASK_SUFFIX}{ext}")
                if truth.is_file() and inside(truth, self.slides_dir):
                    entry.truth = truth
                    break

    def _read_summaries(self) -> None:
        for stem, entry in self.entries.items():
            path = self._beside(f"{stem}{SUMMARY_SUFFIX}")
            if path is None:
                continue
            try:
                summary = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                entry.notes.append(f"{path.name}: not readable JSON ({one_line(err)})")
                continue
            entry.summary = summary if isinstance(summary, dict) else {}

    def _read_report(self, report: str | Path | None) -> None:
        if report is not None:
            path = Path(report)
            path = path / METRICS_FILE if path.is_dir() else path
            if not path.is_file():
                raise ConfigError(f"{path}: no evaluation report ({METRICS_FILE}) there")
        else:
            reports = sorted(self.out_dir.rglob(METRICS_FILE), key=lambda p: (len(p.parts), str(p)))
            reports = [p for p in reports if inside(p, self.out_dir)]
            if not reports:
                return
            path = reports[0]
        try:
            records = json.loads(path.read_text())["slides"]
            by_id = {str(r["slide"]): r for r in records}
        except (OSError, ValueError, KeyError, TypeError) as err:
            message = f"{path}: not an evaluation report ({one_line(err)})"
            if report is not None:
                raise ConfigError(message) from err
            log.warning("%s", message)
            return
        for entry in self.entries.values():
            entry.evaluation = by_id.get(slide_id(entry.name), {})

    def entry(self, name: str) -> SlideEntry:
        """The opened entry; KeyError for a name that is not served."""
        return self.entries[name].open()

    def close(self) -> None:
        for entry in self.entries.values():
            for image in entry.images.values():
                image.slide.close()


def _number(value) -> float | int | None:
    """A finite number as is; anything else (a hand-edited NaN, a string) as None."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return value if ok else None


def _dicom_folder(folder: Path, root: Path) -> bool:
    """A folder of DICOM files (one slide for OpenSlide), none of them a link out of `root`."""
    try:
        files = [p for p in folder.iterdir() if p.name.lower().endswith(".dcm")]
    except OSError:
        return False
    return bool(files) and all(inside(p, root) for p in files)


def _folder(path: str | Path, what: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: {what} folder not found")
    return folder.resolve()
