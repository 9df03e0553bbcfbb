"""The README's main job, end to end on built-in data.

Synthetic kidney slides (training slides plus held-out ones) -> the tiny configuration trained
through the bundle's train.json -> the held-out slides segmented through inference.json ->
validation Dice and whole-slide Dice. The last two lines printed are `val_dice=...` and
`wsi_dice=...`, which scripts read.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from custom.bundle import workflow
from custom.checkpoints import read_checkpoint
from custom.data.datalists import slide_id
from custom.inference.segment import output_paths, raise_on_failures
from custom.metrics.wsi import wsi_dice
from custom.synth import write_synthetic_slides

DEMO_WIDTH, DEMO_HEIGHT = 8192, 6144
TRAIN_SLIDES, HELD_OUT_SLIDES = 4, 1
TRAIN_SEED, HELD_OUT_SEED = 100, 900  # distinct seeds: held-out slides share no tissue with training


def run_demo(out: str | Path = "runs/demo", max_epochs: int | None = None, seed: int = 0) -> dict:
    out = Path(out)
    start = time.perf_counter()
    train_dir, test_dir = out / "slides" / "train", out / "slides" / "held_out"
    print(f"[1/4] synthetic slides -> {out / 'slides'}")
    _synthesise(train_dir, TRAIN_SLIDES, TRAIN_SEED)
    _synthesise(test_dir, HELD_OUT_SLIDES, HELD_OUT_SEED)

    print("[2/4] training the tiny configuration (configs/train.json + configs/tiny.json)")
    train_out = out / "train"
    overrides = {"dataset_dir": str(train_dir), "output_dir": str(train_out), "seed": seed}
    if max_epochs is not None:
        overrides["max_epochs"] = max_epochs
    flow = workflow(["train", "tiny"], "train", **overrides)
    flow.run()
    val_dice = float(flow.parser.get_parsed_content("validate#evaluator").state.best_metric)
    model = out / "model.pt"
    shutil.copyfile(train_out / "model.pt", model)
    config = read_checkpoint(model)["network_config"]
    print(f"      best validation Dice {val_dice:.4f} ({config['name']}, checkpoint {model})")

    print("[3/4] segmenting the held-out slides (configs/inference.json + configs/tiny.json)")
    pred_dir = out / "predictions"
    infer = workflow(
        ["inference", "tiny"],
        "infer",
        input=str(test_dir),
        output_dir=str(pred_dir),
        ckpt_path=str(model),
        overwrite=True,
    )
    raise_on_failures(infer.parser.get_parsed_content("segment"))

    print("[4/4] whole-slide Dice against the exact synthetic ground truth")
    scores = {}
    for slide in sorted(test_dir.glob("*_wsi.tiff")):
        truth = slide.with_name(f"{slide_id(slide)}_mask.tiff")
        paths = output_paths(pred_dir, slide)
        scores[slide.name] = wsi_dice(paths["pred"], truth)
        found = json.loads(paths["summary"].read_text())["glomerulus_count"]
        planted = json.loads(slide.with_name(f"{slide_id(slide)}_objects.json").read_text())["objects"]
        true_count = sum(o["label"] == "glomerulus" for o in planted)
        print(
            f"      {slide.name}: WSI Dice {scores[slide.name]:.4f}, {found} glomeruli found ({true_count} planted)"
        )
        print(f"      mask {paths['pred']}, objects {paths['geojson']}")
    wsi = sum(scores.values()) / len(scores)
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min; outputs in {out}")
    print(f"review them in a browser: python -m custom view {pred_dir} --slides {out / 'slides'}")
    print(f"val_dice={val_dice:.4f}")
    print(f"wsi_dice={wsi:.4f}")
    return {"val_dice": val_dice, "wsi_dice": wsi, "model": str(model), "predictions": str(pred_dir)}


def _synthesise(folder: Path, count: int, seed: int) -> None:
    """Write the slides unless an earlier run already did (they are deterministic per seed)."""
    wanted = [folder / f"synth_{seed + i}_wsi.tiff" for i in range(count)]
    if all(p.exists() and p.with_name(p.name.replace("_wsi", "_mask")).exists() for p in wanted):
        return
    for result in write_synthetic_slides(
        folder, count=count, width=DEMO_WIDTH, height=DEMO_HEIGHT, seed=seed
    ):
        print(f"      {result.summary()}")
