"""benchmarks/context.py --smoke end to end: synthesis, probe, training, segmentation, evaluation, context.json."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def test_context_smoke_writes_both_quick_rows_and_a_warm_started_row(tmp_path):
    rows = "large_context,tiles_512,large_context_progressive"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "context.py"),
            "--smoke",
            "--out",
            str(tmp_path),
            "--rows",
            rows,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "context.json").read_text())

    entries = {(e["row"], e["seed"]): e for e in result["rows"]}
    assert set(entries) == {("large_context", 0), ("tiles_512", 0), ("large_context_progressive", 0)}
    # Smoke caps the large context at 1024 px; every row reads level 2 (1.0 um/px) of 0.25 um/px slides.
    expected_um = {"large_context": 1024.0, "tiles_512": 512.0, "large_context_progressive": 1024.0}
    for (row, _), entry in entries.items():
        assert (entry["mpp"], entry["level"]) == (1.0, 2)
        assert entry["context_um"] == entry["side_px"] * entry["mpp"] == expected_um[row]
        for key in ("wsi_dice", "object_f1", "decoy_rejection", "glomerulus_recall"):
            assert 0.0 <= entry[key] <= 1.0, (row, key, entry[key])
        assert entry["train_s"] > 0
        assert entry["steps"] >= 1 and entry["decoys"] >= 1 and entry["glomeruli"] >= 1
        assert set(entry["slides"]) == {"synth_902", "synth_903"}

    # The per-slide figures pool into the row's: rejection counts decoys, recall counts glomeruli.
    e = entries["large_context", 0]
    called = sum(s["decoys_called_glomerulus"] for s in e["slides"].values())
    assert e["decoy_rejection"] == 1 - called / e["decoys"]

    comparison = result["wilcoxon"][0]
    assert (comparison["row"], comparison["against"], comparison["n_pairs"]) == (
        "large_context",
        "tiles_512",
        2,
    )
    # The warm-started row trains 512-px tiles for half the budget, then fine-tunes that run's best
    # checkpoint at its own patch size: two commands, the second loading the first's model.pt.
    warm = entries["large_context_progressive", 0]
    first, _ = warm["train_cmd"].split(" && ")
    phase0 = tmp_path / "runs" / "large_context_progressive" / "seed0" / "phase0"
    assert f"--out {phase0} " in first and (phase0 / "model.pt").is_file()
    configs = [json.loads((tmp_path / "configs" / f"large_context_progressive_seed0_phase{i}.json").read_text())
               for i in (0, 1)]  # fmt: skip
    assert (configs[0]["patch_size"], configs[0]["batch_size"]) == ([512, 512], 4)
    assert (configs[1]["patch_size"], configs[1]["batch_size"]) == ([1024, 1024], 1)
    assert configs[1]["finetune_from"] == str(phase0 / "model.pt") and "finetune_from" not in configs[0]
    assert (
        configs[0]["network_config#context_branch"]
        == configs[1]["network_config#context_branch"]
        == "orientation"
    )
    assert re.fullmatch(r"\d+ x 4 \+ \d+ x 1", warm["steps_x_batch"]) and warm["warm_step_s"] > 0
    assert ("large_context_progressive", "tiles_512") in {
        (c["row"], c["against"]) for c in result["wilcoxon"]
    }
    assert result["settings"]["mode"] == "smoke" and "equal wall clock" in result["settings"]["budget"]
    assert "| HoloHisto tiny, large context (`large_context`) | 1024 @ 1 (2) | 1024 |" in done.stdout
    assert "`large_context` vs `tiles_512`: 2 pairs" in done.stdout
    # two classes: the mean is the only validation figure, one per epoch
    assert len(e["val_dice_by_epoch"]) == e["epochs"] and e["val_class_dice_by_epoch"] == {}


def test_validation_figures_are_read_per_class_and_per_epoch_from_the_training_log():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from context import validation_by_epoch

    log = (
        "2026-12-04 20:08:01,1 - INFO - Epoch[1] Metrics -- val_dice_glomerulus: 0.3340 "
        "val_dice_glomerulus_mimic: 0.0812 val_mean_dice: 0.2597 \n"
        "2026-12-04 20:08:02,1 - INFO - Epoch: 2/6, Iter: 1/115 -- train_loss: 0.9000 \n"
        "2026-12-04 20:11:40,1 - INFO - Epoch[2] Metrics -- val_dice_glomerulus: 0.6426 "
        "val_dice_glomerulus_mimic: 0.0403 val_mean_dice: 0.5192 \n"
    )
    assert validation_by_epoch(log) == {
        "val_dice_glomerulus": [0.334, 0.6426],
        "val_dice_glomerulus_mimic": [0.0812, 0.0403],
        "val_mean_dice": [0.2597, 0.5192],
    }


def test_context_signal_reads_one_orientation_as_uniform_and_a_turn_as_not():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from context_signal import box, box_sums, orientation_field

    y, x = np.mgrid[:256, :256].astype(np.float32)
    stripes = 128 + 60 * np.sin(2 * np.pi * (x + y) / 24)  # one orientation everywhere
    turned = stripes.copy()
    turned[:, 128:] = (128 + 60 * np.sin(2 * np.pi * (x - y) / 24))[:, 128:]  # the right half at 90 degrees

    def resultant(grey):
        c, s, tissue = orientation_field(np.repeat(grey[..., None], 3, axis=2).astype(np.uint8), 8.0)
        assert tissue.all()
        sc, ss, sw = (box(box_sums(v), 32, 32, 224, 224) for v in (c, s, np.ones_like(c)))
        return np.hypot(sc, ss) / sw

    assert resultant(stripes) > 0.8
    assert resultant(turned) < 0.2
