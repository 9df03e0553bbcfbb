"""Issue 15: does large context beat tiles on data built for it? Synthetic slides with context decoys.

Decoys look exactly like glomeruli within 256 um; only the tubule orientation around them, coherent
over millimetres, gives them away (`python -m custom synth --decoys`). Every row trains and infers at
1.0 um/px (level 2 of the 0.25 um/px slides), where a 2048-px patch covers 2048 um: the field of view
of a 4096-px patch at level 1, affordable on a 2-core CPU. Rows, one switch each from their partner:

    large_context      HoloHisto tiny, 2048 px (2048 um)                          partner tiles_512
    tiles_512          the same at 512 px (512 um): the reference of the Wilcoxon tests
    tiles_1024         the same at 1024 px (1024 um)
    linear_projection  2048 px, a linear patch projection instead of the tokenizer. It keeps the
                       encoder's skip connections, so it does not fully replace the token path:
                       the skips still carry convolutional features (see ablation_no_tokens.json)
    tokens_only        2048 px, the encoder's skips removed: the head sees the ViT's tokens only, so
                       context cannot be drowned by local skips on its way to the logits
    linear_only        tokens_only with a linear patch projection instead of the tokenizer: the
                       projection really replaces the token path (partner tokens_only)
    softmax_attention  2048 px, softmax MHSA instead of ReLU linear attention, at the largest context
                       of any row. It fits: 8.6 s per step and 3.3 GB peak on 2 cores against 4 s
                       linear; at 4096 its ~4.6 s attention share would grow 16x
    tile_sampler       2048 px, a fixed tile grid instead of random foreground patches
    unet, swinunetr    MONAI U-Net / SwinUNETR-V2 on 1024-px tiles (partner tiles_1024)
    *_decoy_class      large_context and tiles_512 trained with the decoys as a class of their own
                       (hard_negative_class.json; the training masks mark them 2), folded into
                       background at inference. DiceCE weighs a decoy pixel as background no more
                       than any other, so this asks whether the decoys can be learnt at each context
                       once the loss must tell them apart. large_context_decoy_class's partner is
                       tiles_512_decoy_class: the same supervision, 4x less context
    *_orientation      large_context and tiles_512 with the fixed orientation-context branch
                       (context_orientation.json; custom/networks/orientation_context.py): maps of how
                       uniform the texture's orientation is over 256 um - 2 mm, clipped to the patch,
                       enter the head at the token grid. The issue-15 design change: context_probe.py
                       found that training retunes the early filters that carry the tell
    large_context_progressive
                       large_context_orientation trained in two halves of the budget: 512-px tiles
                       first (tiles_512_orientation's patch, batch and step time), then 2048 px from
                       the best 512-px checkpoint. Why: at 2048 px the net gets a third of the 512-px
                       row's optimizer steps, and it loses its Dice on outlines drawn too wide and
                       on false calls away from the decoys, not on the decoys themselves

Equal budget, stated: every row gets the same wall-clock time of optimizer steps (--budget_s).
A probe (a short training run per row, once) measures the row's seconds per step from the
trainer's per-iteration log; the row then trains round(budget / step) steps in E epochs, so its
warmup-cosine schedule completes, and the best-validation-Dice checkpoint is kept. Validation
pixels are equal across rows. The measured wall time of each training run (start-up and
validation included) is train_s. No early stopping: `custom train` has no time or patience stop.

    python benchmarks/context.py --out DIR [--quick | --smoke] [--rows a,b] [--seeds 0,1] [--budget_s S]

--quick: large_context and tiles_512, one seed, 7 min of steps each: about 24 min on 2 quiet cores
with synthesis, segmentation and evaluation. Default (full): all rows, 2 seeds, 15 min of steps
each: about 10 h (SwinUNETR alone segments at ~12 s per tile). --smoke: tiny slides, 1024 px at
most, a few steps (the test's run).
Writes DIR/context.json (one entry per row x seed) and prints the table. Entries already under DIR
with the same settings are reused (delete DIR/runs/<row> to redo one). Synthetic slides only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import REPO, Log, cli, decoy_figures, machine_info, synth

from custom.io import write_atomic
from custom.metrics.stats import wilcoxon_p
from custom.synth.scene import MPP_DEFAULT

CONFIGS = REPO / "holohisto_bundle" / "configs"
MPP = 1.0  # um/px every row reads at: level 2 of the synthetic slides
REFERENCE = "tiles_512"
GLOMERULUS_UM = "60,150"  # smaller than synth's default: more objects per slide for the object figures


@dataclass(frozen=True)
class Row:
    key: str
    config: str | None  # override in holohisto_bundle/configs, layered on train.json + tiny.json
    label: str
    side_px: int
    batch: int
    partner: str  # the row it differs from by one switch
    decoy_class: bool = False  # trains on masks that mark the decoys 2 (slides/train_decoy_class)
    # Trains this row (patch, batch, override) for the first half of the budget and epochs, then this
    # row fine-tunes its best checkpoint for the second half.
    warm_start: str | None = None
    probe: str | None = None  # the row whose step-time probe it shares (the same net, patch and batch)


ROWS = {
    r.key: r
    for r in (
        Row("large_context", None, "HoloHisto tiny, large context", 2048, 1, REFERENCE),
        Row(REFERENCE, None, "HoloHisto tiny, 512 tiles", 512, 4, REFERENCE),
        Row("tiles_1024", None, "HoloHisto tiny, 1024 tiles", 1024, 1, REFERENCE),
        Row("linear_projection", "ablation_linear_projection.json", "linear projection (skips kept)", 2048, 1, "large_context"),
        Row("tokens_only", "ablation_tokens_only.json", "tokens only (no skips)", 2048, 1, "large_context"),
        Row("linear_only", "ablation_linear_only.json", "linear projection only (no skips)", 2048, 1, "tokens_only"),
        Row("softmax_attention", "ablation_softmax_attention.json", "softmax MHSA", 2048, 1, "large_context"),
        Row("tile_sampler", "ablation_tile_sampler.json", "tile sampler (fixed grid)", 2048, 1, "large_context"),
        Row("unet", "baseline_unet.json", "U-Net (MONAI), 1024 tiles", 1024, 1, "tiles_1024"),
        Row("swinunetr", "baseline_swinunetr.json", "SwinUNETR-V2 (MONAI), 1024 tiles", 1024, 1, "tiles_1024"),
        Row("large_context_decoy_class", "hard_negative_class.json", "large context, decoy class", 2048, 1,
            "tiles_512_decoy_class", decoy_class=True),
        Row("tiles_512_decoy_class", "hard_negative_class.json", "512 tiles, decoy class", 512, 4, REFERENCE,
            decoy_class=True),
        Row("large_context_orientation", "context_orientation.json", "large context, orientation branch", 2048, 1,
            "tiles_512_orientation"),
        Row("tiles_512_orientation", "context_orientation.json", "512 tiles, orientation branch", 512, 4, REFERENCE),
        Row("large_context_progressive", "context_orientation.json", "large context after 512 tiles, orientation",
            2048, 1, "large_context_orientation", warm_start="tiles_512_orientation",
            probe="large_context_orientation"),
    )
}  # fmt: skip

# Slides: (count, width, height) in level-0 px. Training slides are seeds 101.. (one validates),
# held-out ones test_seed.., so no slide is in both. Smoke's held-out seeds are ones that hold decoys.
MODES = {
    "full": dict(rows=tuple(ROWS), seeds=(0, 1), train=(4, 24576, 16384), test=(6, 16384, 12288),
                 test_seed=901, budget_s=900, epochs=8, val_megapixels=16, probe_steps=4, max_side=None),
    "quick": dict(rows=("large_context", REFERENCE), seeds=(0,), train=(3, 16384, 12288),
                  test=(4, 12288, 8192), test_seed=901, budget_s=420, epochs=6, val_megapixels=16,
                  probe_steps=4, max_side=None),
    "smoke": dict(rows=("large_context", REFERENCE), seeds=(0,), train=(2, 6144, 6144),
                  test=(2, 6144, 6144), test_seed=902, budget_s=6, epochs=1, val_megapixels=1,
                  probe_steps=3, max_side=1024),
}  # fmt: skip
TRAIN_SEED = 101
STEP_LINE = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) - INFO - Epoch: \d+/\d+, Iter: "


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="slides, runs, predictions, reports, context.json")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="large_context and tiles_512, 1 seed (<= 30 min)")
    mode.add_argument("--smoke", action="store_true", help="tiny slides, a few steps (1-3 min)")
    parser.add_argument("--rows", default="", help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--seeds", default="", help="training seeds, comma-separated")
    parser.add_argument("--budget_s", type=float, default=None, help="seconds of optimizer steps per row")
    parser.add_argument("--torch_threads", type=int, default=0, help="OMP_NUM_THREADS; 1 when a core is busy")
    args = parser.parse_args(argv)
    # torch's threads spin-wait for a descheduled peer (10x slower steps on a shared core); the
    # steps are subprocesses, so they inherit the setting.
    if args.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)

    settings = settings_for(args)
    out = Path(args.out)
    log = Log(out / "commands.log")
    machine = machine_info()
    synth_s = make_slides(log, out, settings)
    entries = [run_row(log, out, ROWS[k], s, settings) for k in settings["rows"] for s in settings["seeds"]]
    machine["load_average_end"] = os.getloadavg()
    result = {"rows": entries, "wilcoxon": comparisons(entries), "machine": machine}
    result["settings"] = settings | {"synth_s": synth_s}
    write_atomic(out / "context.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    print(report(result))


def settings_for(args) -> dict:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = MODES[mode] | dict(mode=mode, mpp=MPP, glomerulus_um=GLOMERULUS_UM, train_seed=TRAIN_SEED)
    if args.rows:
        settings["rows"] = [n.strip() for n in args.rows.split(",") if n.strip()]
        if unknown := [n for n in settings["rows"] if n not in ROWS]:
            raise SystemExit(f"unknown row(s) {unknown}; known: {', '.join(ROWS)}")
    if args.seeds:
        settings["seeds"] = [int(s) for s in args.seeds.split(",")]
    if args.budget_s is not None:
        settings["budget_s"] = args.budget_s
    settings["budget"] = (
        f"equal wall clock: {settings['budget_s']:g} s of optimizer steps per row (seconds per step from a "
        f"{settings['probe_steps']}-step probe), {settings['epochs']} epochs, best-validation-Dice checkpoint; "
        f"{settings['val_megapixels']:g} Mpx of validation patches per epoch for every row"
    )
    # As context.json and result.json hold it (tuples become lists), so a stored spec compares equal.
    return json.loads(json.dumps(settings))


def make_slides(log: Log, out: Path, settings: dict) -> float:
    start = time.perf_counter()
    for part, seed in (("train", TRAIN_SEED), ("test", settings["test_seed"])):
        count, width, height = settings[part]
        synth(log, out / "slides" / part, count, seed, width, height, GLOMERULUS_UM)
    if any(ROWS[k].decoy_class for k in settings["rows"]):  # the same slides, decoys marked 2 in the masks
        count, width, height = settings["train"]
        synth(log, train_slides(out, True), count, TRAIN_SEED, width, height, GLOMERULUS_UM, decoy_value=2)
    return time.perf_counter() - start


def train_slides(out: Path, decoy_class: bool) -> Path:
    return out / "slides" / ("train_decoy_class" if decoy_class else "train")


# -- one row x seed -----------------------------------------------------------------------------


def row_spec(row: Row, settings: dict) -> dict:
    """What a row's result depends on, before the probe: a stored result is reused only if it matches."""
    keys = ("train", "test", "test_seed", "budget_s", "epochs", "val_megapixels", "probe_steps", "mpp")
    side = min(row.side_px, settings["max_side"] or row.side_px)
    return {"config": row.config, "side_px": side, "batch": row.batch, **{k: settings[k] for k in keys}}


def phases(row: Row, settings: dict) -> list[tuple[Row, float, int]]:
    """(row whose patch, batch and override train, seconds of steps, epochs) per training phase."""
    if not row.warm_start:
        return [(row, settings["budget_s"], settings["epochs"])]
    epochs = max(1, settings["epochs"] // 2)
    return [(ROWS[row.warm_start], settings["budget_s"] / 2, epochs), (row, settings["budget_s"] / 2, epochs)]


def override(
    out: Path,
    name: str,
    row: Row,
    spec: dict,
    per_epoch: int,
    val: int,
    log_every=20,
    extra: dict | None = None,
) -> Path:
    """OUT/configs/<name>.json: the row's override plus its magnification, patch size and steps."""
    content = json.loads((CONFIGS / row.config).read_text()) if row.config else {}
    content |= extra or {}
    content |= {
        "patch_size": [spec["side_px"], spec["side_px"]],
        "patch_mpp": spec["mpp"],
        "batch_size": row.batch,
        "samples_per_epoch": per_epoch * row.batch,
        "train#epoch_length": per_epoch,
        "val_patches": val,
        "num_workers": 0,
        "log_every": log_every,
    }
    path = out / "configs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=4) + "\n")
    return path


def step_seconds(log: Log, out: Path, row: Row, spec: dict) -> float:
    """Median seconds per optimizer step of a short training run, once per row (start-up left out)."""
    row = ROWS[row.probe] if row.probe else row  # the same net, patch and batch: the same spec
    cached = out / "probes" / f"{row.key}.json"
    if cached.exists() and (stored := json.loads(cached.read_text()))["spec"] == spec:
        return stored["step_s"]
    run_dir = out / "probes" / row.key
    config = override(out, f"probe_{row.key}", row, spec, spec["probe_steps"], 1, log_every=1)
    train(log, train_slides(out, row.decoy_class), run_dir, config, epochs=1, seed=0)
    # Each step logs at its end; a tqdm bar may precede the stamp on the same line, so no "^" anchor.
    stamps = [datetime.strptime(m, "%Y-%m-%d %H:%M:%S,%f") for m in re.findall(STEP_LINE, _log_text(run_dir))]
    if len(stamps) < 2:
        raise SystemExit(f"{run_dir}/train.log: no per-step log lines to time the row by")
    step_s = statistics.median((b - a).total_seconds() for a, b in itertools.pairwise(stamps))
    write_atomic(cached, lambda tmp: tmp.write_text(json.dumps({"spec": spec, "step_s": step_s})))
    return step_s


def train(log: Log, slides: Path, run_dir: Path, config: Path, epochs: int, seed: int) -> tuple[float, str]:
    for stale in run_dir.glob("*.pt"):
        stale.unlink()  # an interrupted run's checkpoint must never stand in for this one
    cmd = cli(
        "train", "--dataset_dir", str(slides), "--out", str(run_dir), "--tiny",
        "--config", str(config), "--max_epochs", str(epochs), "--seed", str(seed),
    )  # fmt: skip
    return log.run(cmd, run_dir / "train.log"), shlex.join(cmd).replace(sys.executable, "python")


def run_row(log: Log, out: Path, row: Row, seed: int, settings: dict) -> dict:
    """Probe, train for the row's share of the budget, segment and score the held-out slides."""
    spec = row_spec(row, settings) | ({"warm_start": row.warm_start} if row.warm_start else {})
    result_path = out / "runs" / row.key / f"seed{seed}" / "result.json"
    if result_path.exists() and (stored := json.loads(result_path.read_text()))["spec"] == spec:
        return stored["entry"]
    run_dir = out / "runs" / row.key / f"seed{seed}"
    train_s, step_s, steps, commands, warm = 0.0, [], [], [], None
    for phase, (trained, budget_s, max_epochs) in enumerate(phases(row, settings)):
        phase_spec = row_spec(trained, settings)
        step_s.append(step_seconds(log, out, trained, phase_spec))
        phase_steps = max(1, round(budget_s / step_s[-1]))
        epochs = min(max_epochs, phase_steps)
        per_epoch = max(1, round(phase_steps / epochs))
        steps.append(f"{per_epoch * epochs} x {trained.batch}")
        val_patches = max(1, round(spec["val_megapixels"] * 1e6 / phase_spec["side_px"] ** 2))  # equal pixels
        name = f"{row.key}_seed{seed}" + (f"_phase{phase}" if row.warm_start else "")
        config = override(out, name, trained, phase_spec, per_epoch, val_patches, extra=warm)
        phase_dir = run_dir / f"phase{phase}" if trained is not row else run_dir
        phase_s, command = train(log, train_slides(out, row.decoy_class), phase_dir, config, epochs, seed)
        train_s += phase_s
        commands.append(command)
        warm = {"finetune_from": str(phase_dir / "model.pt")}
    val = validation_by_epoch(_log_text(run_dir))
    val_dice = val.pop("val_mean_dice", [])
    segment_s, evaluate_s, slides = score(log, out, f"{row.key}/seed{seed}", run_dir / "model.pt")
    entry = {
        "row": row.key, "seed": seed, "side_px": spec["side_px"], "mpp": spec["mpp"],
        "level": round(math.log2(spec["mpp"] / MPP_DEFAULT)), "context_um": spec["side_px"] * spec["mpp"],
        **pooled(slides),
        "train_s": train_s, "step_s": step_s[-1], "steps": per_epoch * epochs, "epochs": epochs, "batch": row.batch,
        "steps_x_batch": " + ".join(steps),  # per phase
        **({"warm_start": row.warm_start, "warm_step_s": step_s[0]} if row.warm_start else {}),
        "val_patches": val_patches, "val_dice_by_epoch": val_dice, "val_class_dice_by_epoch": val,
        "best_val_dice": max(val_dice, default=None),
        "best_val_epoch": val_dice.index(max(val_dice)) + 1 if val_dice else None,
        "segment_s": segment_s, "evaluate_s": evaluate_s, "train_cmd": " && ".join(commands), "slides": slides,
    }  # fmt: skip
    stored = json.dumps({"spec": spec, "entry": entry}, indent=1)
    write_atomic(result_path, lambda tmp: tmp.write_text(stored))
    return entry


def score(log: Log, out: Path, name: str, model: Path) -> tuple[float, float, dict]:
    """Segment the held-out slides (level and tile size from the checkpoint), evaluate, count objects."""
    test_dir, pred_dir, report_dir = out / "slides" / "test", out / "preds" / name, out / "reports" / name
    seg = cli("segment", str(test_dir), "--out", str(pred_dir), "--checkpoint", str(model), "--overwrite")
    segment_s = log.run(seg, pred_dir / "segment.log")
    evaluate = cli("evaluate", str(pred_dir), str(test_dir), "--out", str(report_dir))
    evaluate_s = log.run(evaluate, report_dir / "evaluate.log")
    return (
        segment_s,
        evaluate_s,
        slide_figures(report_dir / "metrics.json", decoy_figures(pred_dir, test_dir)),
    )


def validation_by_epoch(log_text: str) -> dict[str, list[float]]:
    """Every validation metric per epoch from StatsHandler's "Metrics -- name: value ..." lines.

    With 3+ classes the per-class Dice (`val_dice_<class>`) come before `val_mean_dice` on the line.
    """
    by_name: dict[str, list[float]] = {}
    for line in re.findall(r"Metrics -- (.*)", log_text):
        for name, value in re.findall(r"(\w+): ([0-9.]+)", line):
            by_name.setdefault(name, []).append(float(value))
    return by_name


def _log_text(run_dir: Path) -> str:
    return (run_dir / "train.log").read_text(errors="replace")


# -- figures ------------------------------------------------------------------------------------


def slide_figures(metrics: Path, decoys: dict) -> dict:
    """Per held-out slide: WSI Dice, object F1 and the object counts behind rejection and recall."""
    slides = {}
    for s in json.loads(metrics.read_text())["slides"]:
        d = decoys[s["slide"]]
        slides[s["slide"]] = {
            "wsi_dice": s["wsi_dice"],
            "object_f1": s["instance_f1"],
            "decoys": d["decoy"]["objects"],
            "decoys_called_glomerulus": d["decoy"]["objects_called_glomerulus"],
            "glomeruli": d["glomerulus"]["objects"],
            "glomeruli_called_glomerulus": d["glomerulus"]["objects_called_glomerulus"],
        }
    return slides


def pooled(slides: dict) -> dict:
    """Dice and F1 averaged over slides; rejection and recall over all held-out objects (None if none)."""
    counts = ("decoys", "decoys_called_glomerulus", "glomeruli", "glomeruli_called_glomerulus")
    total = {k: sum(s[k] for s in slides.values()) for k in counts}
    return {
        "wsi_dice": statistics.fmean(s["wsi_dice"] for s in slides.values()),
        "object_f1": statistics.fmean(s["object_f1"] for s in slides.values()),
        "decoy_rejection": 1 - total["decoys_called_glomerulus"] / total["decoys"] if total["decoys"] else None,
        "glomerulus_recall": total["glomeruli_called_glomerulus"] / total["glomeruli"] if total["glomeruli"] else None,
        "decoys": total["decoys"],
        "glomeruli": total["glomeruli"],
    }  # fmt: skip


def by_row(entries: list[dict]) -> dict[str, list[dict]]:
    return {key: [e for e in entries if e["row"] == key] for key in dict.fromkeys(e["row"] for e in entries)}


def comparisons(entries: list[dict]) -> list[dict]:
    """Each row against tiles_512 and against its one-switch partner: Wilcoxon over slides x seeds."""
    rows, found = by_row(entries), []
    for key, mine in rows.items():
        for other in dict.fromkeys((REFERENCE, ROWS[key].partner)):
            if key == other or other not in rows:
                continue
            theirs = {(e["seed"], sid): s["wsi_dice"] for e in rows[other] for sid, s in e["slides"].items()}
            ours = {(e["seed"], sid): s["wsi_dice"] for e in mine for sid, s in e["slides"].items()}
            pairs = [(v, theirs[k]) for k, v in ours.items() if k in theirs]
            diff = [a - b for a, b in pairs]
            p = wilcoxon_p(*zip(*pairs, strict=True)) if pairs else math.nan
            found.append({
                "row": key, "against": other, "key": "wsi_dice", "n_pairs": len(pairs),
                "better": sum(d > 0 for d in diff), "worse": sum(d < 0 for d in diff),
                "mean_difference": statistics.fmean(diff) if diff else None,
                "p_value": None if math.isnan(p) else p, "smallest_p": 2 / 2 ** len(pairs) if pairs else None,
            })  # fmt: skip
    return found


def report(result: dict) -> str:
    settings, machine = result["settings"], result["machine"]
    head = ["row", "side px @ um/px (level)", "field of view um", "WSI Dice", "object F1", "decoy rejection",
            "glomerulus recall", "train s", "steps x batch", "best val epoch"]  # fmt: skip
    lines = [
        f"# Context on decoy slides ({settings['mode']}; mean ± sd over seeds {list(settings['seeds'])})",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, no GPU. "
        f"Held-out: {settings['test'][0]} slides of {settings['test'][1]} x {settings['test'][2]} px at "
        f"{MPP_DEFAULT} um/px; training: {settings['train'][0]} (one validates). Budget: {settings['budget']}. "
        "Decoy rejection: share of decoys with under half their area called glomerulus; glomerulus "
        "recall: share of glomeruli with at least half.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for key, entries in by_row(result["rows"]).items():
        e0 = entries[0]
        cells = [f"{ROWS[key].label} (`{key}`)", f"{e0['side_px']} @ {e0['mpp']:g} ({e0['level']})"]
        cells.append(f"{e0['context_um']:g}")
        figures = ("wsi_dice", "object_f1", "decoy_rejection", "glomerulus_recall")
        cells += [_mean_sd([e[k] for e in entries]) for k in figures]
        cells += [
            _mean_sd([e["train_s"] for e in entries], ".0f"),
            e0.get("steps_x_batch", f"{e0['steps']} x {e0['batch']}"),
        ]
        cells.append(", ".join(f"{e['best_val_epoch']}/{e['epochs']}" for e in entries))  # last: no plateau
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Wilcoxon signed-rank (two-sided) on per-slide WSI Dice; pairs: held-out slides x seeds",
        "",
    ]
    for c in result["wilcoxon"]:
        p = "n/a" if c["p_value"] is None else f"{c['p_value']:.3g}"
        mean = "-" if c["mean_difference"] is None else f"{c['mean_difference']:+.4f}"
        smallest = "-" if c["smallest_p"] is None else f"{c['smallest_p']:.3g}"
        lines.append(
            f"- `{c['row']}` vs `{c['against']}`: {c['n_pairs']} pairs, better on {c['better']}, worse on "
            f"{c['worse']}, mean difference {mean}, p = {p} (smallest possible with these pairs: {smallest})"
        )
    return "\n".join(lines)


def _mean_sd(values: list, fmt: str = ".3f") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = f" ± {statistics.stdev(values):{fmt}}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):{fmt}}{sd}"


if __name__ == "__main__":
    main()
