"""`python -m custom VERB ...`: the command line over the same code and configs as the bundle.

Verbs: demo, synth, train, segment, evaluate, compare, kpis-export, export, view. `python -m custom VERB --help`
explains each.
User errors (a missing slide, a checkpoint that does not match, an unwritable folder) end in one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire

from custom.errors import HoloHistoError


def demo(out: str = "runs/demo", max_epochs: int | None = None, seed: int = 0):
    """The README's main job: synthetic slides -> train the tiny net -> segment held-out slides -> Dice.

    Args:
        out: output folder (slides, training run, model.pt, predictions).
        max_epochs: override tiny.json's training length (for a quicker look).
        seed: training seed.
    """
    from custom.demo import run_demo

    run_demo(out, max_epochs=max_epochs, seed=seed)


def synth(
    out_dir: str,
    count: int = 1,
    width: int = 8192,
    height: int = 6144,
    seed: int = 0,
    glomerulus_um: tuple[float, float] = (60.0, 250.0),
    decoys: bool = False,
    prefix: str = "synth",
    neptune: bool = False,
    roi_px: int = 3000,
    decoy_value: int = 0,
    stain_seed: int | None = None,
):
    """Write synthetic kidney slides: <id>_wsi.tiff (pyramidal JPEG TIFF, 0.25 um/px) and <id>_mask.tiff.

    With --neptune: NEPTUNE-style ROIs instead, roi_<seed>_wsi.tiff with a six-class label map
    roi_<seed>_mask.tiff (tuft, capsule, proximal tubule, distal tubule, tubule lumen, interstitium)
    and the datalist neptune.json (see custom/synth/neptune.py).

    Args:
        out_dir: folder to write into (created if missing).
        count: number of slides; slide i uses seed + i.
        width: level-0 width in pixels.
        height: level-0 height in pixels.
        seed: base seed; the same seed gives the same slides.
        glomerulus_um: (min, max) glomerulus diameter in micrometres (mouse ~60-100, human ~150-250).
        decoys: add context decoys: glomerulus-like objects labelled 0 inside a medulla-like region.
        prefix: slide ids are <prefix>_<seed>.
        neptune: write NEPTUNE-style multi-class ROIs (count, seed and roi_px apply).
        roi_px: side of each NEPTUNE-style ROI in pixels.
        decoy_value: the decoys' mask value: 0 (background, as on real slides) or 2, a class of its own
            for training with a hard-negative class (`background_classes` in train.json).
        stain_seed: give every slide the stain of slide `stain_seed` (same tissue, objects and mask),
            to test whether a net fails on a stain rather than on the tissue.
    """
    if neptune:
        from custom.synth.neptune import write_neptune_rois

        print(f"datalist: {write_neptune_rois(out_dir, count=count, seed=seed, side=roi_px)}")
        return
    from custom.synth import write_synthetic_slides

    for result in write_synthetic_slides(
        out_dir,
        count=count,
        width=width,
        height=height,
        seed=seed,
        glomerulus_um=tuple(glomerulus_um),
        decoys=decoys,
        prefix=prefix,
        decoy_value=int(decoy_value),
        stain_seed=None if stain_seed is None else int(stain_seed),
    ):
        print(result.summary())


def train(
    dataset_dir: str | None = None,
    datalist: str | None = None,
    out: str = "runs/train",
    tiny: bool = False,
    max_epochs: int | None = None,
    resume: str | None = None,
    seed: int = 0,
    config: str | None = None,
):
    """Train with the bundle's configs/train.json (plus tiny.json with --tiny).

    Args:
        dataset_dir: a KPIs task-2 folder (<class>/<id>_wsi.tiff with <id>_mask.tiff).
        datalist: or a JSON datalist of {"image", "label"[, "class"]}.
        out: output folder: model.pt (best), final.pt (resumable), tensorboard logs.
        tiny: add configs/tiny.json (CPU-sized net, 512-px patches at level 1).
        max_epochs: override the number of epochs.
        resume: a final.pt/checkpoint to continue from (step count, optimizer, schedule).
        seed: sampling and initialisation seed.
        config: an extra override config, by name under the bundle's configs/ (e.g. ablation_linear_projection).
    """
    from custom.bundle import workflow

    configs = ["train", *(["tiny"] if tiny else []), *([config] if config else [])]
    overrides = {
        "output_dir": str(Path(out)),
        "seed": seed,
        "dataset_dir": dataset_dir or "",
        "datalist": datalist or "",
    }
    if max_epochs is not None:
        overrides["max_epochs"] = max_epochs
    if resume:
        overrides["resume_from"] = resume
    flow = workflow(configs, "train", **overrides)
    flow.run()
    best = flow.parser.get_parsed_content("validate#evaluator").state.best_metric
    print(f"best validation Dice {best:.4f}; model: {Path(out) / 'model.pt'}")


def segment(
    input: str,
    out: str,
    checkpoint: str | None = None,
    overwrite: bool = False,
    level: int | None = None,
    mpp: float | None = None,
    tile: int | None = None,
    overlap: int | None = None,
    probability: bool = False,
):
    """Segment whole slides: OUT/<stem>_pred.tiff (pyramidal mask), <stem>.geojson, <stem>_overlay.png.

    Args:
        input: a slide file, a folder of slides, or a JSON datalist.
        out: output folder.
        checkpoint: model.pt from training (default: the bundle's models/model.pt). The network and
            the patch size/level it was trained with are read from it.
        overwrite: redo slides whose outputs exist (they are skipped otherwise).
        level: read tiles at this pyramid level (default: the training level).
        mpp: or at this resolution in micrometres per pixel.
        tile: tile side in pixels at that level (default: the training patch size).
        overlap: pixels neighbouring tiles share at the inference level (even; default 128, see the model card).
        probability: also write <stem>_prob.tiff, a coarse foreground-probability map.
    """
    from custom.bundle import bundle_root, workflow
    from custom.inference.segment import raise_on_failures

    ckpt = checkpoint or str(bundle_root() / "models" / "model.pt")
    overrides = {"input": input, "output_dir": out, "ckpt_path": ckpt, "overwrite": overwrite}
    if level is not None or mpp is not None:
        overrides.update({"patch_level": level, "patch_mpp": mpp})
    if tile is not None:
        overrides["patch_size"] = [tile, tile]
    if overlap is not None:
        overrides["overlap"] = overlap
    if probability:
        overrides["probability_factor"] = 8
    flow = workflow(["inference"], "infer", **overrides)
    raise_on_failures(flow.parser.get_parsed_content("segment"))


def evaluate(
    pred_dir: str,
    gt_dir: str,
    out: str,
    patch_sizes: str = "4096",
    num_classes: int = 2,
    class_names: str | dict | None = None,
):
    """Score predicted masks against ground truth; write metrics.json, CSV, Markdown and a plot.

    Whole slides: pairs PRED_DIR/<id>_wsi_pred.tiff with <id>_mask.tiff found anywhere under GT_DIR
    (KPIs class folders give the class). Per slide: patch Dice on a grid of tissue patches,
    streaming whole-slide Dice, the KPIs task-2 scoring of the mask as submitted (kpis_*) and after
    the example pipeline's extra steps (kpis_example_*), object precision/recall/F1 and count error.
    KPIs task-1 patches (GT_DIR = <class>/<case>/img|mask/*.jpg): the task-1 Dice of every
    <name>_pred.png in PRED_DIR, by class.

    Args:
        pred_dir: folder of <stem>_pred.tiff masks (from `segment`), or <name>_pred.png patches.
        gt_dir: folder (searched recursively) of <id>_mask.tiff ground truth, or a task-1 folder.
        out: report folder.
        patch_sizes: patch-level Dice sizes in level-0 pixels, e.g. "1024,2048,4096".
        num_classes: label values 0..num_classes-1 (more than 2 adds per-class Dice).
        class_names: names of the labels for the per-class columns: '{1: "tuft", 2: "capsule"}' or a
            JSON file holding that mapping (a datalist's "labels" entry works).
    """
    from custom.metrics.evaluate import evaluate_folders

    report = evaluate_folders(
        pred_dir, gt_dir, out, patch_sizes=patch_sizes, num_classes=num_classes, class_names=class_names
    )
    print(f"report: {Path(out) / 'metrics.json'}")
    if report["errors"]:
        sys.exit(1)


def kpis_export(
    pred_dir: str, out_dir: str, gt: str | None = None, masks: bool = False, overwrite: bool = False
):
    """Write segment's predictions as the KPIs challenge's 20X masks: OUT_DIR/<class>/pred/<id>_pred_final.png.

    Each <id>_wsi_pred.tiff is resampled to 20X as the organisers' script resamples (order-1 zoom by
    1/2; "NEP25" in the path: native 20X, kept as is) and thresholded at 128 of 255 (0/255 grey PNG):
    the mask `evaluate` scores as kpis_*. The names follow the organisers' example output.

    Args:
        pred_dir: folder of <stem>_pred.tiff masks (from `segment`).
        out_dir: folder to write <class>/pred/<id>_pred_final.png into.
        gt: the KPIs task-2 folder: gives each slide its class (and NEP25 rule) and checks its size.
        masks: also write the ground truth at 20X, <class>/mask/<id>_mask.png (needs --gt).
        overwrite: redo masks that exist.
    """
    from custom.outputs.kpis_export import export_kpis

    written, errors = export_kpis(pred_dir, out_dir, gt_dir=gt, masks=masks, overwrite=overwrite)
    for path in written:
        print(path)
    for error in errors:
        print(f"error: {error}")
    print(f"{len(written)} file(s) written, {len(errors)} error(s); masks in {out_dir}")
    if errors:
        sys.exit(1)


def compare(metrics_a: str, metrics_b: str, key: str = "wsi_dice"):
    """Wilcoxon signed-rank test of one per-slide figure between two evaluation reports.

    Args:
        metrics_a: metrics.json of method A (or its report folder).
        metrics_b: metrics.json of method B (or its report folder).
        key: the per-slide figure: wsi_dice, patch_dice, kpis_dice, kpis_f1, instance_f1, ...
    """
    from custom.metrics.compare import compare as compare_reports

    result = compare_reports(metrics_a, metrics_b, key)
    p = result["p_value"]
    print(
        f"{key}: {result['n_pairs']} paired slides, mean A {result['mean_a']:.4f}, mean B {result['mean_b']:.4f}, "
        f"A better on {result['a_better']}, B better on {result['b_better']}, ties {result['ties']}; "
        f"Wilcoxon p = {'n/a' if p is None else f'{p:.4g}'}"
    )


def export(out_dir: str, model: str | None = None, max_file_mb: float | None = 25.0):
    """Write OUT_DIR/holohisto_bundle_v<version>.zip: the bundle another lab downloads and runs as is.

    Args:
        out_dir: folder to write the zip into (created if missing).
        model: a trained model.pt to ship as models/model.pt (weights and recorded settings only).
        max_file_mb: refuse any file over this size (the Model Zoo's 25 MB); None for no limit.
    """
    from custom.export import export_bundle

    print(export_bundle(out_dir, model=model, max_file_mb=max_file_mb))


def view(
    out_dir: str,
    slides: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8765,
    report: str | None = None,
):
    """Review results in a browser: each slide in deep zoom with its mask, outlines, objects and figures.

    Serves OUT_DIR's <stem>_pred.tiff (+ <stem>.geojson, <stem>_summary.json) over HTTP until Ctrl-C,
    with each slide <stem>.<ext> found under SLIDES and its <id>_mask.tiff beside it as ground truth.

    Args:
        out_dir: a `segment` output folder.
        slides: folder searched recursively for the slides (default: OUT_DIR).
        host: address to listen on; the default serves this machine only.
        port: TCP port (0 picks a free one).
        report: an `evaluate` report folder or its metrics.json (default: one found under OUT_DIR).
    """
    from custom.view.server import serve

    serve(out_dir, slides=slides, host=host, port=port, report=report)


def main(argv: list[str] | None = None) -> None:
    verbs = {
        "demo": demo,
        "synth": synth,
        "train": train,
        "segment": segment,
        "evaluate": evaluate,
        "compare": compare,
        "kpis_export": kpis_export,
        "export": export,
        "view": view,
    }
    try:
        fire.Fire(verbs, command=argv, name="python -m custom")
    except Exception as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        sys.exit(2)


def _user_error(err: BaseException) -> HoloHistoError | None:
    """The HoloHistoError behind an exception, also when MONAI's config machinery wrapped it."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, HoloHistoError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
