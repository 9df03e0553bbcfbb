"""Baselines (paper Table 1) and ablations (paper Table 3) by config, on synthetic slides with context decoys.

Every row is one override file in holohisto_bundle/configs, layered on train.json + tiny.json:

    table 1   baseline_unet.json, baseline_swinunetr.json (1024 tiles, inferred seam-free like every row)
              against HoloHisto tiny at 512 (the reference) and at 4096
    table 3   ablation_linear_projection / ablation_no_tokens / ablation_softmax_attention /
              ablation_tile_sampler (all at 512), and the context rows ablation_patch_{512,1024,2048,4096}

One run: synthetic slides with decoys (`python -m custom synth --decoys`) -> `python -m custom train`
per row -> `python -m custom segment` of the held-out slides (tile size and level read from the
checkpoint) -> `python -m custom evaluate` -> the context test: the fraction of the decoys' area
(from each slide's `_objects.json` sidecar) that the row predicts as glomerulus, next to the
fraction of true glomerulus area it finds. Decoys look exactly like glomeruli within 256 um; only
the tubule orientation around them, coherent over millimetres, gives them away.

Equal budgets: every row trains on the same number of pixels (patches x patch area, default
64 steps x 4 patches x 512^2 = 67 Mpx at level 1), so the context rows trade optimizer steps
for context at a fixed data (and, for the linear-cost net, roughly fixed compute) budget: 512 at
batch 4 and 1024 at batch 1 both take 64 steps, 2048 takes 16 and 4096 takes 4. The extra row
patch_4096_x4 gives 4096 four times the shared budget (16 steps), to see what steps alone change. `--max_steps`
caps a row below its share (the table then says so). Validation also holds pixels equal (16 patches
at 512). Each row's budget is written next to its override as a combined config under OUT/configs,
which is what the printed commands pass to `--config`.

    python benchmarks/ablations.py --out /tmp/ablations [--rows patch_512,no_tokens] [--max_steps swinunetr=8]

Rows already trained, segmented or evaluated under OUT are reused (delete a row's folders to redo it).
Figures from synthetic slides only: they say what the switches do on this data, not on kidneys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custom.metrics.compare import compare  # noqa: E402
from custom.wsi.reader import open_mask  # noqa: E402

CONFIGS = REPO / "holohisto_bundle" / "configs"
BASE_SIDE_PX, BASE_BATCH, BASE_STEPS = 512, 4, 64  # the reference budget: 67 Mpx of training patches
BASE_VAL_PATCHES = 16
DECOY_LEVEL_DOWNSAMPLE = 4  # read predictions at the level nearest 4x down for the decoy figure
OBJECT_HIT_FRACTION = 0.5  # an object counts as "called glomerulus" when half its area is predicted


@dataclass(frozen=True)
class Row:
    key: str
    config: str  # override file in holohisto_bundle/configs
    label: str
    side_px: int  # training patch side at the read level (level 1 with tiny.json)
    batch: int
    budget_factor: float = 1.0  # multiple of the shared pixel budget (1 for every row but one)


ROWS = {
    row.key: row
    for row in (
        Row("patch_512", "ablation_patch_512.json", "HoloHisto tiny, 512 (reference)", 512, 4),
        Row("no_tokens", "ablation_no_tokens.json", "no token path (skips only)", 512, 4),
        Row("linear_projection", "ablation_linear_projection.json", "linear patch projection", 512, 4),
        Row("softmax_attention", "ablation_softmax_attention.json", "softmax MHSA", 512, 4),
        Row("tile_sampler", "ablation_tile_sampler.json", "tile sampler (fixed grid)", 512, 4),
        Row("patch_1024", "ablation_patch_1024.json", "context 1024", 1024, 1),
        Row("patch_2048", "ablation_patch_2048.json", "context 2048", 2048, 1),
        Row("unet", "baseline_unet.json", "U-Net (MONAI), 1024 tiles", 1024, 1),
        Row("patch_4096", "ablation_patch_4096.json", "context 4096", 4096, 1),
        Row("patch_4096_x4", "ablation_patch_4096.json", "context 4096, 4x budget", 4096, 1, 4.0),
        Row("swinunetr", "baseline_swinunetr.json", "SwinUNETR-V2 (MONAI), 1024 tiles", 1024, 1),
    )
}
# SwinUNETR-V2 (2D, feature size 24) costs ~35 s per 1024 training step and ~12 s per 1024 tile at
# inference on 2 CPU cores: its full-resolution conv blocks dominate. It runs with --rows swinunetr.
DEFAULT_ROWS = tuple(k for k in ROWS if k != "swinunetr")
NOT_RUN = {"swinunetr": "not run on CPU (too slow, see --rows)"}
TABLE1 = ("unet", "swinunetr", "patch_512", "patch_4096")
TABLE3 = (
    "patch_512",
    "linear_projection",
    "no_tokens",
    "softmax_attention",
    "tile_sampler",
    "patch_1024",
    "patch_2048",
    "patch_4096",
    "patch_4096_x4",
)
SWITCHES = {
    "patch_512": "tokenizer, ReLU linear, random, 512",
    "linear_projection": "**linear proj.**, ReLU linear, random, 512",
    "no_tokens": "**no tokens**, -, random, 512",
    "softmax_attention": "tokenizer, **softmax**, random, 512",
    "tile_sampler": "tokenizer, ReLU linear, **tile**, 512",
    "patch_1024": "tokenizer, ReLU linear, random, **1024**",
    "patch_2048": "tokenizer, ReLU linear, random, **2048**",
    "patch_4096": "tokenizer, ReLU linear, random, **4096**",
    "patch_4096_x4": "tokenizer, ReLU linear, random, **4096**",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="/tmp/ablations", help="slides, runs, predictions and reports")
    parser.add_argument(
        "--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated, from {', '.join(ROWS)}"
    )
    parser.add_argument("--train_slides", type=int, default=3, help="one of them is the validation slide")
    parser.add_argument("--test_slides", type=int, default=2)
    parser.add_argument("--width", type=int, default=24576, help="training slides, level-0 px")
    parser.add_argument("--height", type=int, default=16384)
    parser.add_argument("--test_width", type=int, default=16384, help="held-out slides, level-0 px")
    parser.add_argument("--test_height", type=int, default=12288)
    parser.add_argument(
        "--glomerulus_um", default="60,150", help="min,max diameter; small ones give more objects"
    )
    parser.add_argument("--train_seed", type=int, default=101)
    parser.add_argument("--test_seed", type=int, default=901)
    parser.add_argument("--megapixels", type=float, default=BASE_STEPS * BASE_BATCH * BASE_SIDE_PX**2 / 1e6)
    parser.add_argument("--epochs", type=int, default=4, help="validation + checkpoint after each")
    parser.add_argument("--max_steps", default="", help="caps, e.g. swinunetr=8,patch_4096=8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--torch_threads",
        type=int,
        default=0,
        help="OMP_NUM_THREADS for every step (0: torch's default); 1 avoids threads spinning on a busy shared core",
    )
    parser.add_argument("--report_only", action="store_true", help="print the tables from what is under OUT")
    args = parser.parse_args(argv)

    out = Path(args.out)
    rows = [ROWS[k] for k in _names(args.rows, ROWS)]
    caps = {k: int(v) for k, v in (item.split("=") for item in _names(args.max_steps))}
    log = Log(out / "commands.log")
    if args.torch_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.torch_threads)  # the steps are subprocesses: they inherit it
    machine = machine_info()
    if not args.report_only:
        train_dir, test_dir = out / "slides" / "train", out / "slides" / "held_out"
        um = args.glomerulus_um
        synth(log, train_dir, args.train_slides, args.train_seed, args.width, args.height, um)
        synth(log, test_dir, args.test_slides, args.test_seed, args.test_width, args.test_height, um)
        for row in rows:
            run_row(log, out, row, args, caps.get(row.key))
    machine["load_average_end"] = os.getloadavg()
    print(report(out, machine, args))


# -- the pipeline -------------------------------------------------------------------------------


class Log:
    """Prints each command and keeps the list (with its wall time) in OUT/commands.log."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def run(self, cmd: list[str], logfile: Path) -> float:
        text = shlex.join(cmd)
        print(f"$ {text}", flush=True)
        logfile.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with open(logfile, "w") as f:
            done = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=False)
        seconds = time.perf_counter() - start
        with open(self.path, "a") as f:
            f.write(f"{text}  # {seconds:.0f} s, rc {done.returncode}\n")
        if done.returncode != 0:
            tail = logfile.read_text(errors="replace")[-2000:]
            raise SystemExit(f"command failed (rc {done.returncode}): {text}\n--- {logfile} ---\n{tail}")
        return seconds


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "custom", *args]


def synth(
    log: Log, folder: Path, count: int, seed: int, width: int, height: int, glomerulus_um: str, decoy_value=0
):
    wanted = [
        folder / f"synth_{seed + i}_{part}" for i in range(count) for part in ("wsi.tiff", "objects.json")
    ]
    if all(p.exists() for p in wanted):
        metas = [json.loads(sidecar.read_text()) for sidecar in wanted[1::2]]
        stale = [
            m["slide_id"]
            for m in metas
            if (m["width"], m["height"], m["decoys"], m.get("decoy_mask_value", 0)) != (width, height, True, decoy_value)
        ]  # fmt: skip
        if stale:  # never reuse slides of another size (or without decoys) under the same names
            raise SystemExit(
                f"{folder}: {stale} differ from --width/--height/--decoys/--decoy_value; delete them"
            )
        return
    lo, hi = (float(v) for v in glomerulus_um.split(","))
    cmd = cli(
        "synth", str(folder), "--count", str(count), "--width", str(width), "--height", str(height),
        "--seed", str(seed), "--decoys", "--glomerulus_um", f"[{lo:g},{hi:g}]", "--decoy_value", str(decoy_value),
    )  # fmt: skip
    log.run(cmd, folder / "synth.log")


def budget(row: Row, args, cap: int | None) -> dict:
    """Steps, batch and validation patches that give this row the shared pixel budget."""
    area = row.side_px**2
    steps = max(1, round(row.budget_factor * args.megapixels * 1e6 / (row.batch * area)))
    capped = cap is not None and cap < steps
    steps = min(steps, cap) if cap else steps
    epochs = min(args.epochs, steps)
    per_epoch = max(1, round(steps / epochs))
    val = max(1, round(BASE_VAL_PATCHES * BASE_SIDE_PX**2 / area))
    return {
        "steps": per_epoch * epochs,
        "epochs": epochs,
        "steps_per_epoch": per_epoch,
        "batch": row.batch,
        "val_patches": val,
        "train_megapixels": per_epoch * epochs * row.batch * area / 1e6,
        "capped": capped,
        "budget_factor": row.budget_factor,
    }


def combined_config(out: Path, row: Row, plan: dict) -> Path:
    """OUT/configs/<row>.json: the row's override from configs/ plus its share of the budget."""
    content = json.loads((CONFIGS / row.config).read_text())
    content |= {
        "batch_size": plan["batch"],
        "samples_per_epoch": plan["steps_per_epoch"] * plan["batch"],
        "train#epoch_length": plan["steps_per_epoch"],
        "val_patches": plan["val_patches"],
        "num_workers": 0,
    }
    path = out / "configs" / f"{row.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=4) + "\n")
    return path


def run_row(log: Log, out: Path, row: Row, args, cap: int | None) -> None:
    run_dir, pred_dir, report_dir = out / "runs" / row.key, out / "preds" / row.key, out / "reports" / row.key
    timing_path = run_dir / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    plan = budget(row, args, cap)
    if "train_s" not in timing:
        for stale in [*run_dir.glob("*.pt"), *run_dir.glob("tensorboard/*")]:
            stale.unlink()  # left by an interrupted run: never let its checkpoint stand in for this one
        config = combined_config(out, row, plan)
        cmd = cli(
            "train", "--dataset_dir", str(out / "slides" / "train"), "--out", str(run_dir), "--tiny",
            "--config", str(config), "--max_epochs", str(plan["epochs"]), "--seed", str(args.seed),
        )  # fmt: skip
        timing = {
            "plan": plan,
            "load_average_before": os.getloadavg(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        }
        timing["train_s"] = log.run(cmd, run_dir / "train.log")
        timing["train_cmd"] = shlex.join(cmd)
        best = re.search(
            r"best validation Dice ([0-9.]+)", (run_dir / "train.log").read_text(errors="replace")
        )
        timing["best_val_dice"] = float(best.group(1)) if best else None
        timing_path.write_text(json.dumps(timing, indent=1))
    if "segment_s" not in timing:
        cmd = cli(
            "segment", str(out / "slides" / "held_out"), "--out", str(pred_dir),
            "--checkpoint", str(run_dir / "model.pt"), "--overwrite",
        )  # fmt: skip
        timing["segment_s"] = log.run(cmd, pred_dir / "segment.log")
        timing["segment_cmd"] = shlex.join(cmd)
        timing_path.write_text(json.dumps(timing, indent=1))
    if "evaluate_s" not in timing:
        cmd = cli("evaluate", str(pred_dir), str(out / "slides" / "held_out"), "--out", str(report_dir))
        timing["evaluate_s"] = log.run(cmd, report_dir / "evaluate.log")
        timing["evaluate_cmd"] = shlex.join(cmd)
        timing_path.write_text(json.dumps(timing, indent=1))
    decoys = report_dir / "decoys.json"
    if not decoys.exists():
        figures = decoy_figures(pred_dir, out / "slides" / "held_out")
        decoys.write_text(json.dumps(figures, indent=1))


# -- the context test ---------------------------------------------------------------------------


def decoy_figures(pred_dir: Path, slide_dir: Path) -> dict:
    """Per held-out slide: the share of decoy area (and of glomerulus area) predicted as glomerulus.

    Objects are rasterised from the sidecar's exact outlines, r(phi) = radius * (1 + sum(a cos(k phi + p))),
    at the prediction level nearest 4x down, sampling each pixel at its centre as the mask writer does.
    """
    slides = {}
    for sidecar in sorted(slide_dir.glob("*_objects.json")):
        meta = json.loads(sidecar.read_text())
        pred_path = pred_dir / f"{meta['slide_id']}_wsi_pred.tiff"
        with open_mask(pred_path) as pred:
            level = int(np.argmin([abs(d - DECOY_LEVEL_DOWNSAMPLE) for d in pred.downsamples]))
            predicted = pred.read_level(level) > 0
            h0, w0 = pred.level_shapes[0]
        sy, sx = h0 / predicted.shape[0], w0 / predicted.shape[1]
        per_label = {
            "glomerulus": [0, 0, 0, 0],
            "decoy": [0, 0, 0, 0],
        }  # area, area hit, objects, objects hit
        for obj in meta["objects"]:
            inside, hit = _object_pixels(obj, predicted, sy, sx)
            counts = per_label[obj["label"]]
            counts[0] += inside
            counts[1] += hit
            counts[2] += 1
            counts[3] += int(inside > 0 and hit >= OBJECT_HIT_FRACTION * inside)
        slides[meta["slide_id"]] = {
            label: {
                "area_fraction_predicted": (c[1] / c[0]) if c[0] else None,
                "objects": c[2],
                "objects_called_glomerulus": c[3],
            }
            for label, c in per_label.items()
        }
        slides[meta["slide_id"]]["level_downsample"] = sx
    return slides


def _object_pixels(obj: dict, predicted: np.ndarray, sy: float, sx: float) -> tuple[int, int]:
    window = object_inside(obj, predicted.shape, sy, sx)
    if window is None:
        return 0, 0
    rows, cols, inside = window
    return int(inside.sum()), int((inside & predicted[rows, cols]).sum())


def object_inside(obj: dict, shape: tuple[int, int], sy: float, sx: float):
    """(rows, cols, inside): the sidecar object's pixels in an array of `shape` whose pixel (i, j) is
    sampled at level-0 ((i + 0.5) * sy, (j + 0.5) * sx), as the mask writer samples; None if outside."""
    cx, cy, reach = obj["cx"], obj["cy"], obj["max_radius"]
    r0, r1 = max(0, math.floor((cy - reach) / sy)), min(shape[0], math.ceil((cy + reach) / sy) + 1)
    c0, c1 = max(0, math.floor((cx - reach) / sx)), min(shape[1], math.ceil((cx + reach) / sx) + 1)
    if r0 >= r1 or c0 >= c1:
        return None
    dy = (np.arange(r0, r1) + 0.5)[:, None] * sy - cy
    dx = (np.arange(c0, c1) + 0.5)[None, :] * sx - cx
    phi = np.arctan2(dy, dx)
    outline = np.ones_like(phi)
    for k, amp, phase in obj["outline_harmonics"]:
        outline += amp * np.cos(k * phi + phase)
    return slice(r0, r1), slice(c0, c1), np.hypot(dy, dx) <= obj["radius"] * outline


# -- the tables ---------------------------------------------------------------------------------


def machine_info() -> dict:
    import torch

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_start": os.getloadavg(),
    }


def report(out: Path, machine: dict, args) -> str:
    results = {key: _load_row(out, key) for key in ROWS}
    lines = [
        "# Baselines and ablations (synthetic slides with context decoys)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores (shared), torch {machine['torch']} "
        f"({machine['torch_threads']} threads), no GPU. Load average at start "
        f"{_load(machine['load_average_start'])}, at end {_load(machine.get('load_average_end'))}.",
        f"Slides: {args.train_slides} training (one is validation) of {args.width} x {args.height} px and "
        f"{args.test_slides} held-out of {args.test_width} x {args.test_height} px at 0.25 um/px, decoys on, "
        f"glomeruli {args.glomerulus_um} um across; "
        "training and inference at level 1 (0.5 um/px).",
        f"Budget held equal: {args.megapixels:.0f} Mpx of training patches per row (steps x batch x patch area), "
        f"{BASE_VAL_PATCHES} x 512^2 px of validation patches; best-validation checkpoint.",
        "Dice, F1: mean over held-out slides (per slide in brackets). Decoy %: share of decoy area predicted "
        "as glomerulus (lower is better); glom %: share of true glomerulus area found.",
        "",
        "## Table 1: tile-based baselines against HoloHisto (tiny)",
        "",
        *_table(TABLE1, results, first="Method"),
        "",
        "## Table 3: ablations (token path, attention, sampler, context)",
        "",
        *_table(TABLE3, results, first="Row", switches=True),
        "",
        "## Against the reference (Wilcoxon signed-rank on per-slide WSI Dice)",
        "",
        *_wilcoxon(out, results),
        "",
        "## Commands",
        "",
        "```",
        *_commands(results),
        "```",
    ]
    return "\n".join(lines)


def _table(keys, results, first: str, switches: bool = False) -> list[str]:
    head = [first, *(["tokens, attention, sampler, patch"] if switches else [])]
    head += [
        "WSI Dice",
        "patch Dice",
        "KPIs F1",
        "decoy % (lower better)",
        "glom %",
        "decoys called glom.",
        "best val Dice",
        "steps x batch",
        "train s",
        "segment s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        row, res = ROWS[key], results[key]
        cells = [row.label, *([SWITCHES[key]] if switches else [])]
        if res is None:
            cells += [NOT_RUN.get(key, "not run")] + [""] * (len(head) - len(cells) - 1)
        else:
            plan, timing = res["timing"]["plan"], res["timing"]
            cap = " (capped)" if plan["capped"] else ""
            if plan.get("budget_factor", 1.0) != 1.0:
                cap += f" ({plan['budget_factor']:g}x budget)"
            cells += [
                _per_slide(res["slides"], "wsi_dice"),
                _per_slide(res["slides"], "patch_dice"),
                _per_slide(res["slides"], "kpis_f1"),
                _decoy(res["decoys"], "decoy"),
                _decoy(res["decoys"], "glomerulus"),
                _called(res["decoys"]),
                "-" if timing.get("best_val_dice") is None else f"{timing['best_val_dice']:.3f}",
                f"{plan['steps']} x {plan['batch']}{cap}",
                f"{timing['train_s']:.0f}",
                f"{timing['segment_s']:.0f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _wilcoxon(out: Path, results) -> list[str]:
    ref = out / "reports" / "patch_512" / "metrics.json"
    if results["patch_512"] is None:
        return ["(no reference run)"]
    lines = []
    for key, res in results.items():
        if key == "patch_512" or res is None:
            continue
        c = compare(out / "reports" / key / "metrics.json", ref, "wsi_dice")
        p = "n/a" if c["p_value"] is None else f"{c['p_value']:.3g}"
        lines.append(
            f"- {ROWS[key].label}: {c['n_pairs']} slides, better on {c['a_better']}, worse on {c['b_better']}, "
            f"mean difference {c['mean_difference']:+.4f}, p = {p}"
        )
    lines.append(
        "- With 2 held-out slides the smallest possible two-sided p is 0.5: no difference here is "
        "significant; read the per-slide numbers."
    )
    return lines


def _commands(results) -> list[str]:
    seen, lines = set(), []
    for res in results.values():
        if res is None:
            continue
        for key in ("train_cmd", "segment_cmd", "evaluate_cmd"):
            cmd = res["timing"].get(key)
            if cmd and cmd not in seen:
                seen.add(cmd)
                lines.append(cmd.replace(sys.executable, "python"))
    return lines


def _load_row(out: Path, key: str) -> dict | None:
    timing, metrics = out / "runs" / key / "timing.json", out / "reports" / key / "metrics.json"
    decoys = out / "reports" / key / "decoys.json"
    if not (timing.exists() and metrics.exists() and decoys.exists()):
        return None
    slides = json.loads(metrics.read_text())["slides"]
    return {
        "timing": json.loads(timing.read_text()),
        "slides": {s["slide"]: s for s in slides},
        "decoys": json.loads(decoys.read_text()),
    }


def _per_slide(slides: dict, key: str) -> str:
    values = [s.get(key) for _, s in sorted(slides.items())]
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ({' / '.join(f'{v:.3f}' for v in values)})"


def _decoy(figures: dict, label: str) -> str:
    values = [f[label]["area_fraction_predicted"] for _, f in sorted(figures.items())]
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{100 * np.mean(values):.1f} ({' / '.join(f'{100 * v:.1f}' for v in values)})"


def _called(figures: dict) -> str:
    hit = sum(f["decoy"]["objects_called_glomerulus"] for f in figures.values())
    total = sum(f["decoy"]["objects"] for f in figures.values())
    return f"{hit}/{total}"


def _load(values) -> str:
    return "-" if values is None else " / ".join(f"{v:.1f}" for v in values)


def _names(text: str, known=None) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if known is not None and n not in known]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; known: {', '.join(known)}")
    return names


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


if __name__ == "__main__":
    main()
