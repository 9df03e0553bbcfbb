"""Faithful stem or fast stem: the accuracy and cost of folding the tokenizer's first downsampling into conv_in.

    nice -n 10 .venv/bin/python benchmarks/stem_comparison.py --out /tmp/stem [--epochs 6] [--seeds 0 1]

The full and fast presets differ only in that (the fast tokenizer is the full one without its
full-resolution level), but neither trains on this CPU. So the pair is compared at the tiny width,
where it differs in exactly the same way:

- fast stem: the tiny preset as it is (conv_in stride 2, ch_mult 1,2,2,4);
- faithful stem: the same tokenizer with taming's stride-1 conv_in and one more level of the same
  width at full resolution (ch_mult 1,1,2,2,4), as the full preset has. Every level at stride >= 2,
  the skips, the ViT and the head are the same in both.

Each arm trains through train.json + tiny.json (512-px patches at level 1, batch 4, the same seed, steps
and patches) on synthetic slides and is scored by its best-validation checkpoint on 32 fixed 512-px
patches of a held-out slide (half centred on glomeruli): mean foreground Dice over the patches with
foreground in either mask, and Dice of all their pixels pooled. Also printed: parameters and GFLOPs
per 4096 x 4096 patch (meta device) and the CPU seconds of one 2048 x 2048 forward pass (1 thread, eval)
of each arm, and the training wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `custom` lives in the repository root

from custom.bundle import workflow  # noqa: E402
from custom.checkpoints import config_from_checkpoint, load_weights  # noqa: E402
from custom.data.datalists import load_items  # noqa: E402
from custom.data.patches import FixedTissuePatchDataset  # noqa: E402
from custom.networks import build_network  # noqa: E402
from custom.synth import write_synthetic_slides  # noqa: E402

ARMS = {
    "fast stem (tiny preset)": {},
    "faithful stem": {"ch_mult": [1, 1, 2, 2, 4], "stem_stride": 1},
}
TRAIN_SLIDES, TRAIN_SEED, HELD_OUT_SEED = 4, 100, 900  # the demo's slides
SLIDE_WIDTH, SLIDE_HEIGHT = 8192, 6144
LEVEL, PATCH_PX, SCORE_PATCHES = 1, 512, 32
FLOP_SIDE_PX, SPEED_SIDE_PX = 4096, 2048


def slides(out: Path) -> tuple[Path, Path]:
    train, held_out = out / "slides" / "train", out / "slides" / "held_out"
    if not train.is_dir():
        list(
            write_synthetic_slides(train, TRAIN_SLIDES, SLIDE_WIDTH, SLIDE_HEIGHT, TRAIN_SEED, progress=False)
        )
    if not held_out.is_dir():
        list(write_synthetic_slides(held_out, 1, SLIDE_WIDTH, SLIDE_HEIGHT, HELD_OUT_SEED, progress=False))
    return train, held_out


def network_config(tokenizer: dict) -> dict:
    return {"name": "holohisto", "preset": "tiny", "num_classes": 2, "tokenizer": tokenizer}


def cost(tokenizer: dict) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_network(network_config(tokenizer)).eval()
        images = torch.empty(1, 3, FLOP_SIDE_PX, FLOP_SIDE_PX)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images)
    torch.manual_seed(0)
    model = build_network(network_config(tokenizer)).eval()
    images = torch.rand(1, 3, SPEED_SIDE_PX, SPEED_SIDE_PX)
    with torch.no_grad():
        model(images)  # warm-up
        start = time.process_time()
        model(images)
        cpu_s = time.process_time() - start
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops_4k": counter.get_total_flops() / 1e9,
        f"cpu_s_{SPEED_SIDE_PX}": cpu_s,
    }


def held_out_dice(checkpoint: Path, held_out: Path) -> dict:
    model = load_weights(build_network(config_from_checkpoint(checkpoint)), checkpoint).eval()
    patches = FixedTissuePatchDataset(
        load_items(str(held_out), ""), patch_size=PATCH_PX, patch_level=LEVEL, count=SCORE_PATCHES, seed=7
    )
    dices, inter, total = [], 0, 0
    with torch.no_grad():
        for sample in patches:
            image = sample["image"].as_subclass(torch.Tensor).float()[None] / 255.0
            truth = sample["label"].as_subclass(torch.Tensor)[0] > 0  # a MetaTensor or a plain one
            pred = model(image).argmax(1)[0] > 0
            both, size = int((pred & truth).sum()), int(pred.sum() + truth.sum())
            inter, total = inter + both, total + size
            if size:
                dices.append(2 * both / size)
    return {
        "held_out_mean_dice": sum(dices) / len(dices),
        "held_out_pooled_dice": 2 * inter / total,
        "scored_patches": len(dices),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=6, help="epochs of 32 steps (batch 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(f"load average {os.getloadavg()} at start")
    train, held_out = slides(out)
    results = {}
    for name, tokenizer in ARMS.items():
        results[name] = {"cost": cost(tokenizer), "runs": {}}
        for seed in args.seeds:
            run_dir = out / f"{'faithful' if tokenizer else 'fast'}_seed{seed}"
            start = time.perf_counter()
            flow = workflow(
                ["train", "tiny"],
                "train",
                dataset_dir=str(train),
                output_dir=str(run_dir),
                seed=seed,
                max_epochs=args.epochs,
                **{"network_config#tokenizer": tokenizer},
            )
            flow.run()
            evaluator = flow.parser.get_parsed_content("validate#evaluator")
            run = {
                "steps": int(flow.parser.get_parsed_content("train#trainer").state.iteration),
                "best_val_dice": float(evaluator.state.best_metric),
                "train_wall_s": time.perf_counter() - start,
                **held_out_dice(run_dir / "model.pt", held_out),
            }
            results[name]["runs"][seed] = run
            print(name, seed, json.dumps(run), flush=True)
    print(f"load average {os.getloadavg()} at the end")
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    print(
        f"\n| stem | params (M) | GFLOPs / 4K patch | CPU s / {SPEED_SIDE_PX} px forward | seed | steps "
        "| best val Dice | held-out Dice, mean (pooled) | training wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        c = r["cost"]
        for seed, run in r["runs"].items():
            print(
                f"| {name} | {c['params_m']:.3f} | {c['gflops_4k']:.0f} | {c[f'cpu_s_{SPEED_SIDE_PX}']:.1f} | {seed} "
                f"| {run['steps']} | {run['best_val_dice']:.3f} | {run['held_out_mean_dice']:.3f} "
                f"({run['held_out_pooled_dice']:.3f}) | {run['train_wall_s']:.0f} |"
            )


if __name__ == "__main__":
    main()
