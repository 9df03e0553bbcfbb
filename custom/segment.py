"""Whole-slide segmentation: tissue tiles in, a stitched pyramidal mask, contours and a picture out.

`WholeSlideInferer` is MONAI's `PatchInferer` with the tissue-only `TissueTileSplitter` and the
bounded-memory `RegionMerger`; `segment_batch` runs it over a folder or datalist, one slide at a
time, and a slide that fails is reported and skipped, never fatal to the batch.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import PatchInferer

from custom.data.datalists import SLIDE_EXTENSIONS, _stem, load_datalist
from custom.data.tiling import TilePlan, TissueTileSplitter
from custom.errors import ConfigError, HoloHistoError
from custom.wsi.cleanup import clean_probabilities
from custom.wsi.geojson import iter_features, write_geojson
from custom.wsi.label_pyramid import build_levels, coarsest_level_within, write_label_tiff
from custom.wsi.overlay import write_overlay
from custom.wsi.pyramid import pyramid_shapes, write_pyramid
from custom.wsi.stitch import LabelStore, RegionMerger

logger = logging.getLogger(__name__)

MIN_OBJECT_UM2 = 500.0  # ~25 um across: far below the smallest glomerulus, far above a speck
MAX_HOLE_UM2 = 500.0
CONTOUR_MAX_SIDE_PX = 16384  # GeoJSON is traced on the finest mask level no larger than this
OVERLAY_MAX_SIDE_PX = 2048
DEFAULT_CLASS_NAMES = {1: "Glomerulus"}


def output_paths(out_dir: str | Path, slide: str | Path) -> dict[str, Path]:
    """Where a slide's results go: OUT/<stem>_pred.tiff, <stem>.geojson, <stem>_overlay.png (+ _prob.tiff)."""
    stem = _stem(Path(slide))
    out = Path(out_dir)
    return {
        "pred": out / f"{stem}_pred.tiff",
        "geojson": out / f"{stem}.geojson",
        "overlay": out / f"{stem}_overlay.png",
        "probability": out / f"{stem}_prob.tiff",
    }


def unit_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 RGB tiles to float in [0, 1], the network's input convention."""
    return batch.float().div_(255.0)


def softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=1)


@dataclass
class StitchResult:
    plan: TilePlan
    store: LabelStore
    stats: dict = field(default_factory=dict)


class WholeSlideInferer(PatchInferer):
    """PatchInferer over a slide path: tissue tiles, blended and stitched to a level-0 label store.

    Args:
        splitter: a `TissueTileSplitter` (tile size, overlap, level or mpp, tissue settings).
        batch_size: tiles per forward pass.
        blend: "constant" or "gaussian" weighting of overlapping tiles.
        probability_factor: also keep a foreground-probability map this many times coarser
            than the inference level (None: don't).
        min_object_um2, max_hole_um2: inside each tile, objects smaller than this become
            background and holes smaller than this foreground (0 turns either off; needs the
            slide's mpp). A glomerulus is at least ~2,800 um^2 (60 um across).
        smooth: 3 x 3 majority smoothing of the stitched two-class labels (outlines without
            one-pixel spurs).
        amp: run the network under bfloat16 autocast (GPU).
        work_dir: where temporary stores live (removed after each slide).
    """

    def __init__(
        self,
        splitter: TissueTileSplitter,
        batch_size: int = 1,
        blend: str = "constant",
        sigma_scale: float = 0.125,
        probability_factor: int | None = None,
        min_object_um2: float = MIN_OBJECT_UM2,
        max_hole_um2: float = MAX_HOLE_UM2,
        smooth: bool = True,
        amp: bool = False,
        work_dir: str | None = None,
        buffer_size: int = 2,
        device: torch.device | str | None = None,
    ):
        super().__init__(
            splitter=splitter,
            merger_cls=RegionMerger,
            batch_size=batch_size,
            preprocessing=unit_float,
            postprocessing=softmax,
            buffer_size=buffer_size,
        )
        self.blend, self.sigma_scale = blend, sigma_scale
        self.probability_factor = probability_factor
        self.min_object_um2, self.max_hole_um2 = min_object_um2, max_hole_um2
        self.smooth = smooth
        self.amp = amp
        self.work_dir = work_dir
        self.device = device

    def __call__(self, inputs, network, *args, **kwargs) -> StitchResult:
        plan = self.splitter.plan(inputs)
        store = LabelStore(
            plan.slide.level_shapes[0],
            factor=round(plan.downsample),
            level_shape=plan.shape,
            work_dir=self.work_dir,
            probability_factor=self.probability_factor,
        )
        self.merger_kwargs = {
            "tile_locations": plan.locations,
            "tile_size": plan.tile_size,
            "sink": store,
            "blend": self.blend,
            "sigma_scale": self.sigma_scale,
        }
        min_px, hole_px = self._cleanup_px(plan)
        self.merger_kwargs.update(min_object_px=min_px, max_hole_px=hole_px, smooth=self.smooth)
        self.postprocessing = (
            (lambda x: clean_probabilities(softmax(x), min_px, hole_px)) if min_px or hole_px else softmax
        )
        try:
            stats = {"tiles": 0}
            if plan.locations:
                with torch.inference_mode():
                    stats = super().__call__(inputs, self._runner(network), *args, **kwargs)
            store.close()
        except BaseException:
            with contextlib.suppress(Exception):
                store.close()
            store.remove()
            raise
        return StitchResult(plan, store, stats)

    def _cleanup_px(self, plan: TilePlan) -> tuple[int, int]:
        """Speck and pinhole thresholds in pixels at the inference level (0, 0 without an mpp)."""
        mpp = plan.slide.mpp
        if mpp is None:
            if self.min_object_um2 > 0 or self.max_hole_um2 > 0:
                logger.warning("%s: no mpp, so small objects and holes are not cleaned up", plan.slide.path)
            return 0, 0
        px_um2 = mpp[0] * mpp[1] * plan.downsample**2
        return round(max(0.0, self.min_object_um2) / px_um2), round(max(0.0, self.max_hole_um2) / px_um2)

    def _runner(self, network):
        device = torch.device(self.device) if self.device is not None else next(network.parameters()).device

        def run(batch):
            batch = batch.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
                return network(batch)

        return run


@dataclass
class SlideOutcome:
    slide: str
    status: str  # "done", "no tissue", "skipped", "failed"
    reason: str = ""
    tissue_tiles: int = 0
    seconds: float = 0.0
    outputs: dict = field(default_factory=dict)

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
    """Segment one slide and write its outputs (each atomically)."""
    start = time.perf_counter()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = output_paths(out_dir, slide_path)
    result = inferer(slide_path, network)
    try:
        plan = result.plan
        mpp = plan.slide.mpp[1] if plan.slide.mpp else None
        levels = build_levels(result.store.labels, result.store.dir)
        write_label_tiff(levels, paths["pred"], mpp, progress=f"{paths['pred'].name}" if progress else False)
        if result.store.probability is not None:
            _write_probability(result.store, paths["probability"], mpp)
        k = coarsest_level_within(levels, CONTOUR_MAX_SIDE_PX)
        labels = levels[k][:]
        scale = plan.slide.level_shapes[0][1] / labels.shape[1]
        features = iter_features(labels, scale=scale, mpp=plan.slide.mpp, class_names=class_names)
        objects = write_geojson(paths["geojson"], features)
        del labels
        write_overlay(paths["overlay"], *_overlay_inputs(plan.slide, levels))
    finally:
        result.store.remove()
    status = "done" if plan.locations else "no tissue"
    reason = "" if plan.locations else "no tissue found: wrote an all-zero mask"
    outputs = {k: str(v) for k, v in paths.items() if v.exists()}
    return SlideOutcome(
        slide_path,
        status,
        reason,
        tissue_tiles=len(plan.locations),
        seconds=time.perf_counter() - start,
        outputs=outputs | {"objects": str(objects)},
    )


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

    Under torchrun each rank takes every world_size-th slide.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write_test_"):
            pass  # a unique name: several ranks probe the same folder at once
    except OSError as err:
        raise ConfigError(f"{out_dir}: output folder cannot be written ({err.strerror or err})") from err
    slides = list_slides(inputs)
    rank, world = _rank_world()
    mine = slides[rank::world]
    class_names = class_names or DEFAULT_CLASS_NAMES
    outcomes = []
    for slide in mine:
        paths = output_paths(out_dir, slide)
        if not overwrite and all(paths[k].exists() for k in ("pred", "geojson", "overlay")):
            outcomes.append(SlideOutcome(slide, "skipped", "outputs exist (use --overwrite to redo)"))
            continue
        try:
            outcomes.append(segment_slide(slide, out_dir, network, inferer, class_names, progress))
        except Exception as err:  # one bad slide never stops the batch; it is reported by name
            logger.error("%s: failed: %s", slide, err)
            outcomes.append(SlideOutcome(slide, "failed", _reason(err)))
        finally:
            _release_splitter_cache(inferer)
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
    rows = [("slide", "status", "tiles", "seconds", "note")]
    for o in outcomes:
        secs = f"{o.seconds:.1f}" if o.seconds else "-"
        tiles = str(o.tissue_tiles) if o.status in ("done", "no tissue") else "-"
        rows.append((Path(o.slide).name, o.status, tiles, secs, o.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + ("  " + r[4] if r[4] else "")
        for r in rows
    ]
    failed = sum(o.failed for o in outcomes)
    lines.append(f"{len(outcomes)} slide(s): {len(outcomes) - failed} ok, {failed} failed")
    return "\n".join(lines)


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


def _overlay_inputs(slide, levels):
    level = len(slide.level_shapes) - 1
    for i, (h, w) in enumerate(slide.level_shapes):
        if max(h, w) <= OVERLAY_MAX_SIDE_PX:
            level = i
            break
    thumb = slide.read_level(level)
    k = coarsest_level_within(levels, max(thumb.shape[:2]))
    return thumb, levels[k][:]


def _write_probability(store: LabelStore, path: Path, mpp: float | None) -> None:
    prob = store.probability
    step = store.factor * store.probability_factor
    shapes = pyramid_shapes(*prob.shape, min_side=512)
    base = np.asarray(prob[:])  # already coarse (probability_factor x the inference level)
    levels = [base] + [base[:: 2**k, :: 2**k] for k in range(1, len(shapes))]
    write_pyramid(
        path,
        [lv.shape for lv in levels],
        lambda level, y, x, h, w: levels[level][y : y + h, x : x + w],
        channels=1,
        mpp=mpp * step if mpp else None,
        compression="lzw",
    )


def _release_splitter_cache(inferer) -> None:
    splitter = getattr(inferer, "splitter", None)
    if splitter is not None and getattr(splitter, "_plan", None) is not None:
        with contextlib.suppress(Exception):
            splitter._plan.slide.close()
        splitter._plan = None


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def raise_on_failures(outcomes: list[SlideOutcome]) -> list[SlideOutcome]:
    """End a bundle run with an error (non-zero exit) when any slide failed; the table is already printed."""
    failed = [o for o in outcomes if o.failed]
    if failed:
        names = ", ".join(Path(o.slide).name for o in failed[:5])
        raise SlideBatchError(f"{len(failed)} of {len(outcomes)} slide(s) failed: {names}")
    return outcomes


class SlideBatchError(HoloHistoError):
    """Some slides of a batch failed (each is named in the summary table)."""
