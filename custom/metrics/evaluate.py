"""Score predicted whole-slide masks against ground truth: pairing, per-slide figures, reports.

`evaluate_folders` pairs `<stem>_pred.tiff` in a prediction folder with `<id>_mask.tiff` of the
same slide under a ground-truth folder (KPIs class folders work), scores every pair and writes
`metrics.json`, `per_slide.csv`, `summary.md` and `dice_per_slide.png` (see `custom.metrics.report`).
A file without its partner, or a slide that cannot be scored, is an entry under "errors" in the
report; the other slides go on. A KPIs task-1 folder (<class>/<case>/img|mask/*.jpg) as ground
truth is scored patch by patch instead (`custom.metrics.evaluate_patches`).

Per slide, level 0 of both masks is read twice: once block by block for the patch and whole-slide
Dice (which also samples the masks for the instance metrics), and once band by band by the KPIs
protocol, which needs its own order-1 resampling.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from custom.data.datalists import (
    KPIS_CLASSES,
    MASK_SUFFIX,
    SLIDE_EXTENSIONS,
    _kpis_class,
    _stem,
    natural_key,
    slide_id,
)
from custom.data.tissue import TissueCache
from custom.errors import ConfigError, HoloHistoError, SlideError
from custom.metrics.evaluate_patches import evaluate_patch_folders, is_patch_layout
from custom.metrics.instances import INSTANCE_UM_PER_PX, MaskSampler, instance_factor, instance_scores
from custom.metrics.kpis import downsample_factor, kpis_task2, remove_small_components
from custom.metrics.patches import BLOCK_PX, DEFAULT_PATCH_PX, count_grid, patch_dice, tissue_patches
from custom.metrics.report import build_report, class_table, error_entry, parse_class_names, write_reports
from custom.wsi.reader import open_mask, open_slide

logger = logging.getLogger(__name__)

PRED_SUFFIX = "_pred"
MASK_EXTENSIONS = (".tiff", ".tif")
# Components smaller than this (both masks) are not objects: a 16-um disc is far below any
# glomerulus (mouse ~60 um across, ~3,000 um2) but well above the specks a noisy mask leaves.
INSTANCE_MIN_UM2 = 200.0
# Pixel size assumed for instance sampling when neither mask file records one (KPIs scans: 40x).
ASSUMED_MPP = 0.25


@dataclass(frozen=True)
class SlidePair:
    """One slide's prediction and ground truth, found by `pair_folders`."""

    slide: str  # slide id: <id> of <id>_wsi.tiff
    class_name: str | None  # the KPIs class folder the ground truth sits in, if any
    prediction: Path
    ground_truth: Path
    image: Path | None  # the slide itself, whose tissue mask picks the patches; None when absent


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    out_dir: str | Path,
    patch_sizes: int | str | list[int] | tuple[int, ...] = (DEFAULT_PATCH_PX,),
    num_classes: int = 2,
    instance_um_per_px: float = INSTANCE_UM_PER_PX,
    instance_min_um2: float = INSTANCE_MIN_UM2,
    progress: bool = True,
    class_names: dict | str | None = None,
) -> dict:
    """Score every <stem>_pred.tiff in PRED_DIR against its <id>_mask.tiff under GT_DIR; write a report.

    A slide <id>_wsi.tiff has the ground truth <id>_mask.tiff, searched recursively, so KPIs
    task-2 folders (<class>/<id>_wsi.tiff + <id>_mask.tiff) work and each slide gets its class.
    Per slide: patch-level Dice (the mean over a fixed grid of tissue patches), whole-slide Dice
    (full resolution, streamed), the KPIs task-2 figures of the mask as submitted (Dice,
    precision, recall, F1, F1 with the script's contour shift) and after the example pipeline's
    vote and small-object removal (kpis_example_*), glomerulus detection precision/recall/F1 at
    IoU >= 0.5 and the count error; per-label Dice for multi-class masks. A prediction without
    ground truth, a ground truth without prediction and a slide that cannot be read are listed
    under "errors"; the rest are still scored. A KPIs task-1 folder as GT_DIR (no <id>_mask.tiff,
    <class>/<case>/img/*_img.jpg patches) is scored patch by patch with the task-1 protocol.

    Writes REPORT_DIR/metrics.json, per_slide.csv, summary.md (by class, patch- against WSI-level
    Dice) and dice_per_slide.png.

    Args:
        pred_dir: folder with <stem>_pred.tiff masks (the output folder of `segment`).
        gt_dir: folder searched recursively for <id>_mask.tiff (and <id>_wsi.tiff for tissue).
        out_dir: report folder (created if missing).
        patch_sizes: patch side(s) in level-0 pixels for patch-level Dice, e.g. 4096 or
            1024,2048,4096; each a multiple of the smallest. The 4096 one (else the largest) is
            the report's patch_dice.
        num_classes: label values 0..num_classes-1; 2 means binary (any value > 0 is foreground).
        instance_um_per_px: resolution for the instance metrics, in micrometres per pixel.
        instance_min_um2: components smaller than this area (um^2) are not counted as objects
            in either mask (0 counts every speck).
        progress: show a progress bar over slides.
        class_names: {label: name} for the per-label columns, or a JSON file holding that
            mapping (a datalist's "labels" entry works).
    """
    pred_dir, gt_dir, out_dir = Path(pred_dir), Path(gt_dir), Path(out_dir)
    if is_patch_layout(gt_dir):
        return evaluate_patch_folders(pred_dir, gt_dir, out_dir, progress=_flag(progress))
    sizes = parse_patch_sizes(patch_sizes)
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes must be at least 2 (background + one class), got {num_classes}")
    pairs, errors = pair_folders(pred_dir, gt_dir)
    tissue = TissueCache()
    slides = []
    for pair in tqdm(pairs, desc="evaluate", unit="slide", disable=not _flag(progress)):
        try:
            slides.append(
                score_slide(
                    pair, sizes, int(num_classes), float(instance_um_per_px), float(instance_min_um2), tissue
                )
            )
        except Exception as err:  # one bad slide never stops the evaluation; it is reported by name
            logger.error("%s: not scored: %s", pair.slide, err)
            errors.append(error_entry(pair.slide, _reason(err), pair.prediction, pair.ground_truth))
    settings = {
        "pred_dir": str(pred_dir.resolve()),
        "gt_dir": str(gt_dir.resolve()),
        "patch_sizes_px": list(sizes),
        "primary_patch_px": primary_patch_size(sizes),
        "num_classes": int(num_classes),
        "instance_um_per_px": float(instance_um_per_px),
        "instance_min_um2": float(instance_min_um2),
        "class_names": parse_class_names(class_names),
    }
    report = build_report(slides, errors, settings)
    write_reports(out_dir, report)
    print(class_table(report))
    for error in errors:
        print(f"error: {error['slide']}: {error['error']}")
    print(f"{len(slides)} slide(s) scored, {len(errors)} error(s); report in {out_dir}")
    return report


def pair_folders(pred_dir: Path, gt_dir: Path) -> tuple[list[SlidePair], list[dict]]:
    """Pairs of (prediction, ground truth) by slide id, and an error entry for each unpaired file."""
    for folder, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not folder.is_dir():
            raise ConfigError(f"{folder}: {what} folder not found")
    errors: list[dict] = []
    ambiguous: set[str] = set()
    predictions = _index(
        (p for p in sorted(pred_dir.rglob(f"*{PRED_SUFFIX}.tif*")) if p.suffix.lower() in MASK_EXTENSIONS),
        lambda p: slide_id(_stem(p)[: -len(PRED_SUFFIX)]),
        "predictions",
        errors,
        ambiguous,
    )
    truths = _index(
        (p for p in sorted(gt_dir.rglob(f"*{MASK_SUFFIX}.tif*")) if p.suffix.lower() in MASK_EXTENSIONS),
        lambda p: _stem(p)[: -len(MASK_SUFFIX)],
        "ground truths",
        errors,
        ambiguous,
    )
    # An empty side is almost always the wrong folder: say so instead of one error per slide.
    if not predictions and not errors:
        raise ConfigError(f"{pred_dir}: no <stem>{PRED_SUFFIX}.tiff predictions found")
    if not truths and not errors:
        raise ConfigError(f"{gt_dir}: no <id>{MASK_SUFFIX}.tiff ground-truth masks found")
    images = {}
    for path in sorted(gt_dir.rglob("*_wsi.*")):
        if path.name.lower().endswith(SLIDE_EXTENSIONS):
            images.setdefault(slide_id(path), path)
    pairs = []
    for sid in sorted((set(predictions) | set(truths)) - ambiguous, key=natural_key):
        pred, truth = predictions.get(sid), truths.get(sid)
        if truth is None:
            errors.append(
                error_entry(sid, f"no ground truth: {sid}{MASK_SUFFIX}.tiff not found under {gt_dir}", pred)
            )
        elif pred is None:
            errors.append(
                error_entry(
                    sid, f"no prediction: {sid}_wsi{PRED_SUFFIX}.tiff not found in {pred_dir}", None, truth
                )
            )
        else:
            pairs.append(SlidePair(sid, _kpis_class(truth, gt_dir), pred, truth, images.get(sid)))
    pairs.sort(key=lambda p: (_class_rank(p.class_name), natural_key(p.slide)))
    return pairs, errors


def score_slide(
    pair: SlidePair,
    patch_sizes: tuple[int, ...] = (DEFAULT_PATCH_PX,),
    num_classes: int = 2,
    instance_um_per_px: float = INSTANCE_UM_PER_PX,
    instance_min_um2: float = INSTANCE_MIN_UM2,
    tissue: TissueCache | None = None,
) -> dict:
    """Every per-slide figure of one pair, as a flat record (the keys are listed in the docs)."""
    start = time.perf_counter()
    with open_mask(pair.prediction) as pred, open_mask(pair.ground_truth) as gt:
        shape = tuple(gt.level_shapes[0])
        if tuple(pred.level_shapes[0]) != shape:
            (h, w) = pred.level_shapes[0]
            raise SlideError(
                pair.prediction,
                f"prediction is {h} x {w} px (height x width) but its ground truth "
                f"{pair.ground_truth.name} is {shape[0]} x {shape[1]} px at level 0",
            )
        mpp = gt.mpp or pred.mpp
        mpp_x = mpp[1] if mpp else ASSUMED_MPP
        factor = instance_factor(shape, mpp_x, instance_um_per_px)
        sampled = MaskSampler(shape, factor)
        # blocks must hold whole patches of the smallest size and whole sampling cells
        unit = math.lcm(min(patch_sizes), factor)
        block_px = math.ceil(BLOCK_PX / unit) * unit
        cells = count_grid(pred, gt, min(patch_sizes), num_classes, block_px=block_px, on_block=sampled)
        kpis_factor = downsample_factor(pair.ground_truth)  # the script: "NEP25" in the path: 20X already
        kpis = kpis_task2(pred, gt, kpis_factor)

    record = {"slide": pair.slide, "class": pair.class_name}
    totals = cells.total()
    record["wsi_dice"] = totals.mean()
    if num_classes > 2:
        record |= {f"dice_label_{c}": d for c, d in totals.per_class().items()}
    eligible_of, grid_note = _patch_eligibility(pair, shape, tissue or TissueCache())
    primary = primary_patch_size(patch_sizes)
    for size in patch_sizes:
        result = patch_dice(cells.coarsen(size), eligible_of(size))
        if size == primary:
            record["patch_dice"] = result.mean
        record |= {
            f"patch_dice_{size}": result.mean,
            f"patches_scored_{size}": result.scored,
            f"patches_empty_{size}": result.empty,
        }
    record |= kpis.record() | {"kpis_downsample": kpis_factor}
    min_px = math.ceil(instance_min_um2 / (factor * mpp_x) ** 2)
    objects = instance_scores(*(remove_small_components(m, min_px) for m in (sampled.pred, sampled.gt)))
    record |= {
        "instance_precision": objects.precision,
        "instance_recall": objects.recall,
        "instance_f1": objects.f1,
        "instance_n_pred": objects.n_pred,
        "instance_n_gt": objects.n_gt,
        "count_error": objects.count_error,
        "instance_downsample": factor,
        "instance_um_per_px": factor * mpp[1] if mpp else None,
        "height_px": shape[0],
        "width_px": shape[1],
        "patch_grid": grid_note,
        "prediction": str(pair.prediction),
        "ground_truth": str(pair.ground_truth),
        "seconds": round(time.perf_counter() - start, 2),
    }
    return record


def parse_patch_sizes(patch_sizes) -> tuple[int, ...]:
    """Patch sides from an int, a list or a "1024,2048" string; each a multiple of the smallest."""
    if isinstance(patch_sizes, str):
        patch_sizes = [s for s in patch_sizes.replace(" ", "").strip("[]()").split(",") if s]
    elif isinstance(patch_sizes, (int, np.integer)):
        patch_sizes = [patch_sizes]
    try:
        sizes = tuple(sorted({int(s) for s in patch_sizes}))
    except (TypeError, ValueError):
        raise ConfigError(
            f"patch_sizes must be pixel sizes like 4096 or 1024,2048,4096, got {patch_sizes!r}"
        ) from None
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"patch_sizes must be positive pixel sizes, got {patch_sizes!r}")
    if any(s % sizes[0] for s in sizes):
        raise ConfigError(f"every patch size must be a multiple of the smallest ({sizes[0]} px), got {sizes}")
    return sizes


def primary_patch_size(sizes: tuple[int, ...]) -> int:
    """The size reported as `patch_dice`: 4096 when asked for (the paper's column), else the largest."""
    return DEFAULT_PATCH_PX if DEFAULT_PATCH_PX in sizes else max(sizes)


def _patch_eligibility(pair: SlidePair, shape, tissue_cache: TissueCache):
    """A function size -> eligible-patch grid, and a note saying which patches were eligible.

    Patches are the slide's tissue patches when the slide image sits beside the ground truth;
    otherwise every patch is eligible (empty patches are still left out, so only false positives
    on glass can differ).
    """
    if pair.image is None:
        return (lambda size: None), "all patches (no slide image found for a tissue mask)"
    try:
        with open_slide(pair.image) as slide:
            if tuple(slide.level_shapes[0]) != shape:
                raise SlideError(pair.image, f"is {slide.level_shapes[0]} px, its masks {shape}")
            mask = tissue_cache.get(slide)
    except HoloHistoError as err:
        logger.warning("%s: patches not limited to tissue: %s", pair.slide, err)
        return (lambda size: None), f"all patches (tissue not found: {_reason(err)})"
    if mask.empty:
        return (lambda size: None), "all patches (no tissue detected on the slide)"
    return (lambda size: tissue_patches(mask, shape, size)), "tissue patches"


def _index(paths, key_of, what: str, errors: list[dict], ambiguous: set[str]) -> dict[str, Path]:
    """{slide id: path}; an id found twice is ambiguous: reported, added to `ambiguous`, not scored."""
    found: dict[str, list[Path]] = {}
    for path in paths:
        found.setdefault(key_of(path), []).append(path)
    index = {}
    for sid, paths_of in found.items():
        if len(paths_of) == 1:
            index[sid] = paths_of[0]
        else:
            ambiguous.add(sid)
            listed = ", ".join(str(p) for p in paths_of)
            errors.append(error_entry(sid, f"{len(paths_of)} {what} for one slide, not scored: {listed}"))
    return index


def _flag(value) -> bool:
    """A switch that may arrive from a bundle command line as the text 'false'."""
    return (
        value.strip().lower() not in ("", "0", "false", "no", "off")
        if isinstance(value, str)
        else bool(value)
    )


def _reason(err: BaseException) -> str:
    text = str(err) if isinstance(err, HoloHistoError) else f"{type(err).__name__}: {err}"
    return text.splitlines()[0] if text else type(err).__name__


def _class_rank(name: str | None) -> tuple[int, str]:
    return (KPIS_CLASSES.index(name), "") if name in KPIS_CLASSES else (len(KPIS_CLASSES), name or "")
