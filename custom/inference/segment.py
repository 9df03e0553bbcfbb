"""Segment slides: one slide's outputs from its stitched labels, and a batch that never stops on a bad slide.

Per slide, into the output folder (each file written atomically):
  <stem>_pred.tiff      pyramidal label mask, the slide's level-0 geometry (QuPath, ASAP, OpenSlide, cuCIM)
  <stem>.geojson        one polygon per object, holes as interior rings, QuPath measurements
  <stem>_objects.csv    one row per object: centroid, area, equivalent diameter, perimeter
  <stem>_summary.json   counts, glomeruli per mm2 of tissue, tissue area, settings and timings
  <stem>_overlay.png    the slide's thumbnail (read once, with the tissue) with the outlines drawn
  <stem>_prob.tiff      optional coarse foreground probability
The mask's TIFF is encoded on its own threads while the objects are traced from the same cells.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from custom.data.datalists import SLIDE_EXTENSIONS, _stem, load_datalist
from custom.errors import ConfigError, HoloHistoError
from custom.inference.inferer import StitchResult, WholeSlideInferer
from custom.io import rank_world
from custom.outputs.geojson import TracedObject, trace_objects
from custom.outputs.label_tiff import write_label_pyramid
from custom.outputs.objects import write_object_outputs
from custom.outputs.pyramid import pyramid_shapes, write_pyramid
from custom.outputs.tables import slide_summary, write_json

logger = logging.getLogger(__name__)

DEFAULT_CLASS_NAMES = {1: "Glomerulus"}
REQUIRED_OUTPUTS = ("pred", "geojson", "objects", "summary", "overlay")


def output_paths(out_dir: str | Path, slide: str | Path) -> dict[str, Path]:
    """Where a slide's results go (see the module docstring)."""
    stem = _stem(Path(slide))
    out = Path(out_dir)
    return {
        "pred": out / f"{stem}_pred.tiff",
        "geojson": out / f"{stem}.geojson",
        "objects": out / f"{stem}_objects.csv",
        "summary": out / f"{stem}_summary.json",
        "overlay": out / f"{stem}_overlay.png",
        "probability": out / f"{stem}_prob.tiff",
    }


@dataclass
class SlideOutcome:
    slide: str
    status: str  # "done", "no tissue", "skipped", "failed"
    reason: str = ""
    tissue_tiles: int = 0
    seconds: float = 0.0
    objects: int = 0
    outputs: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def segment_slide(
    slide_path: str,
    out_dir: str | Path,
    network,
    inferer: WholeSlideInferer,
    class_names: dict[int, str] | None = None,
    progress: bool = True,
) -> SlideOutcome:
    """Segment one slide and write its outputs."""
    start = time.perf_counter()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, slide_path)
    class_names = class_names or DEFAULT_CLASS_NAMES
    result = inferer(slide_path, network)
    try:
        plan, slide = result.plan, result.plan.slide
        shape0, mpp = tuple(slide.level_shapes[0]), slide.mpp
        factor = max(1, round(plan.downsample))
        outputs_start = time.perf_counter()
        with ThreadPoolExecutor(2, thread_name_prefix="slide-outputs") as side:
            mask = side.submit(
                write_label_pyramid,
                paths["pred"],
                result.labels,
                factor,
                shape0,
                mpp[1] if mpp else None,
                progress=paths["pred"].name if progress else False,
            )
            prob = None
            if result.probability is not None:
                step = factor * inferer.probability_factor  # level-0 pixels per probability pixel
                prob = side.submit(_write_probability, result.probability, paths["probability"], step, mpp)
            thumb = plan.thumbnail
            tally = write_object_outputs(
                traced_objects(result, factor, inferer.cleanup_px(plan)[0]),
                paths,
                mpp,
                class_names,
                thumb,
                thumb.shape[1] / shape0[1],
            )
            mask.result()
            if prob is not None:
                prob.result()
        timings = {k: round(v, 3) for k, v in result.stats.items() if k.endswith("_s")}
        timings["outputs_s"] = round(time.perf_counter() - outputs_start, 3)
        settings = {
            "inference": {
                "level": plan.level,
                "downsample": plan.downsample,
                "mpp_um": mpp[1] * plan.downsample if mpp else None,
                "tile_px": list(plan.tile_size),
                "overlap_px": 2 * plan.grid.margin[0],
                "blend": inferer.blend,
                "tiles": plan.tissue_tiles,
                "grid_tiles": plan.grid_tiles,
            },
            "cleanup": {"min_object_um2": inferer.min_object_um2, "max_hole_um2": inferer.max_hole_um2},
            "seconds": timings | {"total_s": round(time.perf_counter() - start, 3)},
        }
        summary = slide_summary(str(slide_path), tally, plan.tissue.fraction, shape0, mpp, **settings)
        write_json(paths["summary"], summary)
    finally:
        result.close()
        result.plan.slide.close()
    status = "done" if plan.cells else "no tissue"
    reason = "" if plan.cells else "no tissue found: wrote an all-zero mask"
    return SlideOutcome(
        str(slide_path),
        status,
        reason,
        tissue_tiles=plan.tissue_tiles,
        seconds=time.perf_counter() - start,
        objects=tally.total,
        outputs={k: str(v) for k, v in paths.items() if v.exists()},
        timings=settings["seconds"],
    )


def traced_objects(result: StitchResult, factor: int, min_piece_px: int = 0) -> Iterator[TracedObject]:
    """Every kept object of a stitched slide, traced from its own box of the cells (one polygon each), one at a time."""
    labels = result.labels
    for box, seed in result.objects:
        y0, x0 = max(0, int(box[0]) - 1), max(0, int(box[1]) - 1)
        crop = labels.read(y0, int(box[2]) + 1, x0, int(box[3]) + 1)
        yield from trace_objects(crop, (int(seed[0]) - y0, int(seed[1]) - x0), (y0, x0), factor, min_piece_px)


def segment_batch(
    inputs,
    out_dir: str | Path,
    network,
    inferer: WholeSlideInferer,
    overwrite: bool = False,
    class_names: dict[int, str] | None = None,
    progress: bool = True,
) -> list[SlideOutcome]:
    """Segment every slide of `inputs` (a slide, a folder or a JSON datalist); never stops on a bad slide.

    Under torchrun each rank takes every world_size-th slide. `class_names` may have string keys
    (as JSON configs and checkpoints record them).
    """
    class_names = {int(k): v for k, v in (class_names or DEFAULT_CLASS_NAMES).items()}
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write_test_"):
            pass  # a unique name: several ranks probe the same folder at once
    except OSError as err:
        raise ConfigError(f"{out_dir}: output folder cannot be written ({err.strerror or err})") from err
    slides = list_slides(inputs)
    rank, world = rank_world()
    outcomes = []
    for slide in slides[rank::world]:
        paths = output_paths(out_dir, slide)
        if not overwrite and all(paths[k].exists() for k in REQUIRED_OUTPUTS):
            outcomes.append(SlideOutcome(slide, "skipped", "outputs exist (use --overwrite to redo)"))
            continue
        try:
            outcomes.append(segment_slide(slide, out_dir, network, inferer, class_names, progress))
        except Exception as err:  # one bad slide never stops the batch; it is reported by name
            logger.error("%s: failed: %s", slide, err)
            outcomes.append(SlideOutcome(slide, "failed", _reason(err)))
    print(summary_table(outcomes))
    return outcomes


def list_slides(inputs) -> list[str]:
    """A slide file, a folder of slides (recursively; masks and our outputs are left out) or a datalist."""
    if isinstance(inputs, (list, tuple)):
        return [str(s) for s in inputs]
    path = Path(inputs)
    if not path.exists():
        raise ConfigError(f"{path}: no such slide, folder or datalist")
    if path.is_file() and path.suffix.lower() == ".json":
        return [item["image"] for item in load_datalist(path, require_labels=False)]
    if path.is_file():
        return [str(path)]
    slides = []
    for f in sorted(path.rglob("*")):
        name = f.name.lower()
        if not f.is_file() or name.startswith("."):
            continue
        if not name.endswith(SLIDE_EXTENSIONS) or _is_derived(name):
            continue
        if name.endswith(".dcm") and any(s.endswith(".dcm") and Path(s).parent == f.parent for s in slides):
            continue  # one DICOM slide is a folder of files: take one file per folder
        slides.append(str(f))
    if not slides:
        raise ConfigError(f"{path}: no slide files ({', '.join(SLIDE_EXTENSIONS)}) found")
    return slides


def summary_table(outcomes: list[SlideOutcome]) -> str:
    rows = [("slide", "status", "tiles", "objects", "seconds", "note")]
    for o in outcomes:
        done = o.status in ("done", "no tissue")
        rows.append(
            (
                Path(o.slide).name,
                o.status,
                str(o.tissue_tiles) if done else "-",
                str(o.objects) if done else "-",
                f"{o.seconds:.1f}" if o.seconds else "-",
                o.reason,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + ("  " + r[5] if r[5] else "")
        for r in rows
    ]
    failed = sum(o.failed for o in outcomes)
    lines.append(f"{len(outcomes)} slide(s): {len(outcomes) - failed} ok, {failed} failed")
    return "\n".join(lines)


def raise_on_failures(outcomes: list[SlideOutcome]) -> list[SlideOutcome]:
    """End a bundle run with an error (non-zero exit) when any slide failed; the table is already printed."""
    failed = [o for o in outcomes if o.failed]
    if failed:
        names = ", ".join(Path(o.slide).name for o in failed[:5])
        raise SlideBatchError(f"{len(failed)} of {len(outcomes)} slide(s) failed: {names}")
    return outcomes


class SlideBatchError(HoloHistoError):
    """Some slides of a batch failed (each is named in the summary table)."""


def _is_derived(name: str) -> bool:
    return any(
        name.endswith(f"{tag}{ext}") for tag in ("_mask", "_pred", "_prob") for ext in SLIDE_EXTENSIONS
    )


def _reason(err: BaseException) -> str:
    reason = str(err) or type(err).__name__
    cause = err.__cause__
    if isinstance(err, RuntimeError) and cause is not None:
        reason = f"{reason}: {cause}"
    return reason.splitlines()[0]


def _write_probability(prob, path: Path, step: int, mpp) -> Path:
    """The coarse foreground probability as a pyramid (its own level 0 is `step` level-0 pixels a pixel)."""
    shapes = pyramid_shapes(*prob.shape, min_side=512)
    levels = [prob]
    while len(levels) < len(shapes):
        levels.append(levels[-1].halved())
    try:
        return write_pyramid(
            path,
            shapes,
            lambda level, y, x, h, w: levels[level].read(y, y + h, x, x + w),
            channels=1,
            mpp=mpp[1] * step if mpp else None,
            compression="lzw",
        )
    finally:
        for level in levels[1:]:
            level.close()
