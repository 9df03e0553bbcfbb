"""Score KPIs task-1 patch predictions the way the organisers' `Validation_patch_docker` does.

Ground truth is a task-1 folder, `<class>/<case>/img/<name>_img.jpg` with `mask/<name>_mask.jpg`
(2048 x 2048). A prediction is any `<name>_pred.{png,tif,tiff,jpg}` under PRED_DIR, searched
recursively; `<name>_img_pred.png` and the example validator's own `val_<name>_img.jpg_pred.png`
pair with the same patch. Each patch gets `kpis_task1_dice` (NaN, left out of every mean, when its
mask is empty), so a class's mean over its patches is that class's task-1 score, and the "all"
row is the challenge's figure.

Prediction values: 8-bit files are read as value / 255 (0/255 masks and 8-bit probabilities),
files holding only 0 and 1 as they are, float TIFFs as probabilities; the first channel of a
colour file (the example saves RGBA grey images). Then the protocol thresholds at 0.5.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from custom.data.datalists import discover_kpis_patches, is_patch_folder, natural_key
from custom.errors import ConfigError
from custom.metrics.kpis import kpis_patch_dice
from custom.metrics.report import TASK1, build_report, error_entry, write_reports

logger = logging.getLogger(__name__)

PRED_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_PRED_NAME = re.compile(r"^(?:val_)?(?P<id>.+?)(?:_img(?:\.jpg)?)?_pred$", re.IGNORECASE)


def is_patch_layout(gt_dir: str | Path) -> bool:
    """A task-1 folder: patches under <case>/img/, and no whole-slide <id>_mask.tiff anywhere."""
    return is_patch_folder(gt_dir) and next(Path(gt_dir).rglob("*_mask.tif*"), None) is None


def patch_id(name: str) -> str | None:
    """The patch a prediction file belongs to (`<name>` of `<name>_img.jpg`), or None if not one."""
    stem, ext = Path(name).stem, Path(name).suffix.lower()
    if ext not in PRED_EXTENSIONS:
        return None
    match = _PRED_NAME.match(stem)
    return match["id"] if match else None


def read_prediction(path: Path) -> np.ndarray:
    """A prediction file as values in [0, 1] (see the module docstring), 2-D."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not a readable prediction image ({err})") from None
    if array.ndim == 3:
        array = array[..., 0]
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float64)
    if array.dtype == bool or array.max(initial=0) <= 1:
        return array.astype(np.float64)
    return array.astype(np.float64) / 255.0


def read_mask(path: Path) -> np.ndarray:
    """A task-1 mask (JPEG) as grey levels; the protocol min-max scales it."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L"))
    except OSError as err:
        raise ConfigError(f"{path}: not a readable mask image ({err})") from None


def evaluate_patch_folders(pred_dir: Path, gt_dir: Path, out_dir: Path, progress: bool = True) -> dict:
    """Score every task-1 patch under GT_DIR against its prediction in PRED_DIR; write the report."""
    if not pred_dir.is_dir():
        raise ConfigError(f"{pred_dir}: prediction folder not found")
    items = [it for it in discover_kpis_patches(gt_dir) if it.get("label")]
    errors: list[dict] = []
    predictions: dict[str, list[Path]] = {}
    for path in sorted(pred_dir.rglob("*_pred.*")):
        pid = patch_id(path.name)
        if pid is not None:
            predictions.setdefault(pid, []).append(path)
    if not predictions:
        raise ConfigError(f"{pred_dir}: no <name>_pred.png (or .tif, .jpg) patch predictions found")
    records = []
    known = set()
    for item in tqdm(items, desc="evaluate", unit="patch", disable=not progress):
        pid = Path(item["image"]).name.removesuffix("_img.jpg")
        known.add(pid)
        found = predictions.get(pid, [])
        if len(found) != 1:
            reason = "no prediction" if not found else f"{len(found)} predictions for one patch, not scored"
            errors.append(
                error_entry(pid, f"{reason}: {pid}_pred.png not found in {pred_dir}" if not found else reason)
            )
            continue
        try:
            records.append(_score(pid, item, found[0]))
        except ConfigError as err:
            logger.error("%s: not scored: %s", pid, err)
            errors.append(error_entry(pid, str(err), found[0], item["label"]))
    for pid in sorted(set(predictions) - known, key=natural_key):
        errors.append(
            error_entry(pid, f"no ground truth: no {pid}_img.jpg under {gt_dir}", predictions[pid][0])
        )
    settings = {"task": TASK1, "pred_dir": str(pred_dir.resolve()), "gt_dir": str(gt_dir.resolve())}
    report = build_report(records, errors, settings)
    write_reports(out_dir, report)
    summary = report["summary"]
    for name, fig in summary.items():
        print(f"{name}: {fig['n_slides']} patch(es), task-1 Dice {fig.get('kpis_task1_dice')}")
    print(f"{len(records)} patch(es) scored, {len(errors)} error(s); report in {out_dir}")
    return report


def _score(pid: str, item: dict, prediction: Path) -> dict:
    mask = read_mask(Path(item["label"]))
    pred = read_prediction(prediction)
    if pred.shape != mask.shape:
        raise ConfigError(
            f"{prediction}: prediction is {pred.shape[0]} x {pred.shape[1]} px but its mask "
            f"{Path(item['label']).name} is {mask.shape[0]} x {mask.shape[1]} px"
        )
    dice = kpis_patch_dice(pred, mask)
    return {
        "slide": pid,
        "class": item.get("class"),
        "case": item.get("case"),
        "kpis_task1_dice": dice,
        "kpis_n_scored": int(not np.isnan(dice)),
        "prediction": str(prediction),
        "ground_truth": item["label"],
    }
