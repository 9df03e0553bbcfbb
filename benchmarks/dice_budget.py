"""Issue 15: where a prediction's WSI Dice goes on decoy slides, in shares of the true glomerulus area.

For each held-out slide (its sidecar gives every object's exact outline), the prediction and the truth
are read at the level nearest 4x down (1 um/px on the synthetic slides) and the errors are split:

    decoy FP     called glomerulus inside a decoy: what context should remove
    rim FP       called glomerulus within RIM_UM of a true glomerulus: outlines drawn too wide
    other FP     called glomerulus anywhere else
    missed FN    inside a glomerulus the prediction missed (under half its area called)
    boundary FN  the rest of the misses: outlines too tight on glomeruli that were found

with the Dice the slide would have without the decoy FP, and without the missed FN as well. Why: the
Dice gap between two rows mixes the decoys, which only context can fix, with outlines and misses,
which are training. Each figure is a share of the slide's (or all slides') glomerulus area.

    python benchmarks/dice_budget.py --slides DIR PRED_DIR [PRED_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import distance_transform_edt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import DECOY_LEVEL_DOWNSAMPLE, OBJECT_HIT_FRACTION, object_inside

from custom.wsi.reader import open_mask

KEYS = ("true", "tp", "fp", "fn", "decoy_fp", "rim_fp", "missed_fn")
RIM_UM = 16.0  # a token's width at 1 um/px: how far a blurred outline reaches


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--slides", required=True, help="decoy slides with <id>_mask.tiff and <id>_objects.json"
    )
    parser.add_argument("pred_dirs", nargs="+", help="folders of <id>_wsi_pred.tiff from `segment`")
    args = parser.parse_args(argv)
    for pred_dir in args.pred_dirs:
        slides = {sid: counts for sid, counts in slide_counts(Path(pred_dir), Path(args.slides))}
        print(f"## {pred_dir}")
        for sid, counts in slides.items():
            print(line(sid, counts))
        print(line("all slides", {k: sum(c[k] for c in slides.values()) for k in KEYS}))


def slide_counts(pred_dir: Path, slide_dir: Path):
    """(slide id, pixel counts) per sidecar under slide_dir: true area, TP, FP, FN, decoy FP, missed FN."""
    for sidecar in sorted(slide_dir.glob("*_objects.json")):
        meta = json.loads(sidecar.read_text())
        sid = meta["slide_id"]
        with open_mask(str(pred_dir / f"{sid}_wsi_pred.tiff")) as pred:
            level = int(np.argmin([abs(d - DECOY_LEVEL_DOWNSAMPLE) for d in pred.downsamples]))
            called = pred.read_level(level) > 0
            h0, w0 = pred.level_shapes[0]
        with open_mask(str(slide_dir / f"{sid}_mask.tiff")) as mask:
            true = mask.read_level(level) > 0
        if true.shape != called.shape:
            raise ValueError(
                f"{pred_dir}/{sid}: prediction {called.shape} and mask {true.shape} differ at level {level}"
            )
        sy, sx = h0 / called.shape[0], w0 / called.shape[1]
        decoy, missed = np.zeros_like(true), np.zeros_like(true)
        for obj in meta["objects"]:
            window = object_inside(obj, called.shape, sy, sx)
            if window is None:
                continue
            rows, cols, inside = window
            if obj["label"] == "decoy":
                decoy[rows, cols] |= inside
            elif (called[rows, cols] & inside).sum() < OBJECT_HIT_FRACTION * inside.sum():
                missed[rows, cols] |= inside
        fp, fn = called & ~true, true & ~called
        rim = distance_transform_edt(~true, sampling=(sy * meta["mpp"], sx * meta["mpp"])) <= RIM_UM
        yield sid, {
            "true": int(true.sum()), "tp": int((true & called).sum()), "fp": int(fp.sum()), "fn": int(fn.sum()),
            "decoy_fp": int((fp & decoy).sum()), "rim_fp": int((fp & rim & ~decoy).sum()),
            "missed_fn": int((fn & missed).sum()),
        }  # fmt: skip


def dice(tp: float, fp: float, fn: float) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def line(name: str, c: dict) -> str:
    true = max(c["true"], 1)
    no_decoy = dice(c["tp"], c["fp"] - c["decoy_fp"], c["fn"])
    no_miss = dice(c["tp"] + c["missed_fn"], c["fp"] - c["decoy_fp"], c["fn"] - c["missed_fn"])
    return (
        f"- {name}: Dice {dice(c['tp'], c['fp'], c['fn']):.3f}, without decoy FP {no_decoy:.3f}, and without "
        f"missed glomeruli {no_miss:.3f}; decoy FP {c['decoy_fp'] / true:.3f}, rim FP {c['rim_fp'] / true:.3f}, "
        f"other FP {(c['fp'] - c['decoy_fp'] - c['rim_fp']) / true:.3f}, missed FN {c['missed_fn'] / true:.3f}, boundary FN "
        f"{(c['fn'] - c['missed_fn']) / true:.3f}"
    )


if __name__ == "__main__":
    main()
