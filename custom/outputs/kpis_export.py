"""Turn `segment`'s predictions into the masks the KPIs challenge asks for: 20X, named as its example.

The organisers' README asks for segmentation output at 20X; their example (`unet_validation_slide.py`,
"your inference code") writes each slide's final mask as `<class>/pred/<id>_pred_final.png` in its
output folder, beside `<class>/img/<id>_wsi.png` and `<class>/mask/<id>_mask.png`. We write the same
names: `OUT/<class>/pred/<id>_pred_final.png`, the class folder spelt as in the input (the README's
layouts say 56NX, the data's folders 56Nx), `OUT/pred/...` when the slide is in no class folder.

Each mask is level 0 of `<id>_wsi_pred.tiff` resampled as the script resamples (order-1 zoom by
1/2; "NEP25" anywhere in the ground-truth or prediction path: native 20X, 1/1) and thresholded at
128 of 255, exactly the mask `evaluate` scores as `kpis_*`. Values 0 and 255 in one grey channel:
the script reads masks back with matplotlib (0..1 floats) and counts 1.0 as foreground, so a 0/1
PNG would read as empty. (The example itself saves its 0/1 array through a grey colormap as RGBA.)
With `masks`, the ground truth goes to `<class>/mask/<id>_mask.png`, zoomed as the script zooms it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from custom.data.datalists import MASK_SUFFIX, _stem, kpis_class, natural_key, slide_id
from custom.errors import ConfigError, HoloHistoError
from custom.io import write_atomic
from custom.metrics.kpis import downsample_factor, iter_zoom_bands, submitted_bands
from custom.outputs.png import write_grey_png
from custom.wsi.reader import open_mask

logger = logging.getLogger(__name__)

PRED_SUFFIX = "_pred"
EXPORT_SUFFIX = "_pred_final.png"
MASK_PNG_SUFFIX = "_mask.png"
FOREGROUND = 255


def export_kpis(
    pred_dir: str | Path,
    out_dir: str | Path,
    gt_dir: str | Path | None = None,
    masks: bool = False,
    overwrite: bool = False,
) -> tuple[list[Path], list[str]]:
    """Write every prediction of PRED_DIR as a 20X challenge mask; returns (written files, errors).

    With `gt_dir` (a KPIs task-2 folder), each slide's class and 20X rule come from its ground
    truth, whose level-0 size must match the prediction's; a prediction without one is an error.
    Without it, they come from the prediction's own path. A slide that fails is reported, the
    others go on; finished files are kept unless `overwrite`.
    """
    pred_dir, out_dir = Path(pred_dir), Path(out_dir)
    if not pred_dir.is_dir():
        raise ConfigError(f"{pred_dir}: prediction folder not found")
    predictions = sorted(
        (p for p in pred_dir.rglob(f"*{PRED_SUFFIX}.tif*") if p.suffix.lower() in (".tif", ".tiff")),
        key=lambda p: natural_key(p.name),
    )
    if not predictions:
        raise ConfigError(f"{pred_dir}: no <stem>{PRED_SUFFIX}.tiff predictions found")
    if masks and gt_dir is None:
        raise ConfigError("masks=True exports the ground truth too: pass gt_dir")
    truths = _truths(Path(gt_dir)) if gt_dir is not None else {}
    written, errors = [], []
    for pred in predictions:
        sid = slide_id(_stem(pred)[: -len(PRED_SUFFIX)])
        truth = truths.get(sid)
        try:
            if gt_dir is not None and truth is None:
                raise ConfigError(f"no ground truth {sid}{MASK_SUFFIX}.tiff under {gt_dir}")
            source = truth or pred
            root = Path(gt_dir) if truth else pred_dir
            folder = out_dir / _class_folder(source, root)
            target = folder / "pred" / f"{sid}{EXPORT_SUFFIX}"
            outputs = [target] + ([folder / "mask" / f"{sid}{MASK_PNG_SUFFIX}"] if masks else [])
            if not overwrite and all(p.exists() for p in outputs):
                logger.info("%s: exists, kept (overwrite=True to redo)", target)
                continue
            factor = downsample_factor(source)
            written += _export_slide(pred, truth, factor, outputs)
        except (HoloHistoError, OSError, ValueError) as err:
            logger.error("%s: not exported: %s", sid, err)
            errors.append(f"{sid}: {str(err).splitlines()[0]}")
    return written, errors


def _export_slide(pred: Path, truth: Path | None, factor: int, outputs: list[Path]) -> list[Path]:
    with open_mask(pred) as mask:
        shape = tuple(mask.level_shapes[0])
        if truth is not None:
            with open_mask(truth) as gt:
                if tuple(gt.level_shapes[0]) != shape:
                    raise ConfigError(
                        f"{pred}: prediction is {shape[0]} x {shape[1]} px but its ground truth "
                        f"{truth.name} is {gt.level_shapes[0][0]} x {gt.level_shapes[0][1]} px"
                    )
        mpp = mask.mpp[1] * factor if mask.mpp else None
        small = (round(shape[0] / factor), round(shape[1] / factor))
        bands = ((band.astype("uint8") * FOREGROUND) for _, band in submitted_bands(mask, factor))
        outputs[0].parent.mkdir(parents=True, exist_ok=True)
        write_atomic(outputs[0], lambda tmp: write_grey_png(tmp, small, bands, mpp))
    if len(outputs) > 1:
        with open_mask(truth) as gt:
            outputs[1].parent.mkdir(parents=True, exist_ok=True)
            zoomed = (band for _, band in iter_zoom_bands(gt, factor))
            write_atomic(outputs[1], lambda tmp: write_grey_png(tmp, small, zoomed, mpp))
    return outputs


def _class_folder(path: Path, root: Path) -> str:
    """The class folder name as the input spells it (56NX or 56Nx), or "" outside a class folder."""
    for parent in path.parents:
        if parent == root or parent == parent.parent:
            break
        if kpis_class(parent.name):
            return parent.name
    return ""


def _truths(gt_dir: Path) -> dict[str, Path]:
    if not gt_dir.is_dir():
        raise ConfigError(f"{gt_dir}: ground-truth folder not found")
    found: dict[str, Path] = {}
    for path in sorted(gt_dir.rglob(f"*{MASK_SUFFIX}.tif*")):
        found.setdefault(_stem(path)[: -len(MASK_SUFFIX)], path)
    return found
