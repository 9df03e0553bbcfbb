"""Memory of one full-size training step on the CPU, with and without activation checkpointing.

    nice -n 10 .venv/bin/python benchmarks/train_memory.py [--sides 1024 2048] [--threads 1]
        [--memory-limit-gb 14] [--timeout-s 3600] [--preset full] [--skip-flops]

Every configuration is one training step in a fresh subprocess: build the net (`--preset`, random
weights, train mode), AdamW over its trainable parameters with their gradients and both moments
allocated beforehand, a 1 x 3 x S x S patch and labels; then forward, the project's loss
(`SegmentationLoss`: DiceCE + the quantizer's loss), backward and the optimizer step, in float32.
Reported: the step's peak resident memory above the resident memory just before it (Linux VmHWM after
resetting it through /proc/self/clear_refs), i.e. activations and temporaries only, and the step's
wall and CPU seconds. Weights, gradients and AdamW moments (16 bytes per trainable parameter, 4 per
frozen one) are the constant part, printed once; they do not grow with the patch.

Configurations: tokenizer frozen or trainable x checkpointing "off" (nothing recomputed), "windows"
(only the tokenizer's window batches, the checkpointing train.json had before `set_grad_checkpointing`;
for a frozen tokenizer it is the same as off) and "all" (`set_grad_checkpointing(True)`: the tokenizer's
window batches, every ViT block, the head's fusion blocks and x2 steps).

Extrapolation to 4096 px: activation memory is linear in pixels, so a side S is scaled by
(4096 / S)^2. One part is not linear unless made so: a checkpointed tokenizer recomputes one window
batch at a time, 16 windows of 256 px at 4K, i.e. 1/16 of the patch. Each side therefore runs with the
window batch that covers the same 1/16 of its patch (1 window at 1024 px, 4 at 2048), so the recomputed
share scales like everything else. (At 1024 px with 16-window batches the whole patch is one batch, and
scaling that x16 overstates a checkpointed trainable tokenizer by the whole encoder's activations.)

First, unless --skip-flops: what checkpointing costs in compute, independent of the machine's load.
torch's FlopCounterMode (convolutions, matrix products, attention) counts the step's forward and the
whole step on a 256-px patch, scaled x256 to 4096 px; the recomputation is the whole step's count with
checkpointing minus without. (The whole step's own total is not printed: FlopCounterMode counts the
weight gradient of a grouped, e.g. depthwise, conv as if the conv were dense, which inflates every
backward alike and cancels in the difference.) `--flops-only` stops after it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_SIDE_PX = 4096
# The window batch the presets use at 4096 px, and the share of a 4K patch it covers.
WINDOW_BATCH_AT_TARGET = 16
FLOP_SIDE_PX = 256
GIB = 1024**3
KB = 1024
# The issue's goal for one 4096 x 4096 step at batch 1 (activations), GiB.
GOAL_GIB = {"frozen": 40.0, "trainable": 80.0}
CONFIGS = {
    "frozen": ("off", "all"),
    "trainable": ("off", "windows", "all"),
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def window_batch_for(side_px: int) -> int:
    """The window batch that covers the share of a side_px patch that 16 windows cover at 4096 px."""
    return max(1, round(WINDOW_BATCH_AT_TARGET * (side_px / TARGET_SIDE_PX) ** 2))


def build(preset: str, tokenizer: str, mode: str, window_batch: int):
    from custom.networks import build_network

    net = build_network(
        {
            "name": "holohisto",
            "preset": preset,
            "freeze_tokenizer": tokenizer == "frozen",
            # k-means runs once per training run; it is not what a step costs
            "tokenizer": {"kmeans_init": False, "window_batch": window_batch},
        }
    )
    if mode == "windows":
        net.tokenizer.set_grad_checkpointing(True)
    elif mode == "all":
        net.set_grad_checkpointing(True)
    return net.train()


def worker(args: argparse.Namespace) -> dict:
    limit = int(args.memory_limit_gb * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from custom.training import SegmentationLoss, aux_loss_of

    torch.set_num_threads(args.threads)
    side, tokenizer, mode = int(args.worker[0]), args.worker[1], args.worker[2]
    torch.manual_seed(0)
    net = build(args.preset, tokenizer, mode, window_batch_for(side))
    loss_fn = SegmentationLoss(aux_loss_of(net))
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # allocates AdamW's moments now: constant memory, outside the measured peak
    images = torch.rand(1, 3, side, side)
    labels = (torch.rand(1, 1, side, side) > 0.8).long()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before_kb = _status_kb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=False)
    loss = loss_fn(net(images), labels)
    loss.backward()
    optimizer.step()
    return {
        "peak_gib": (_status_kb("VmHWM") - before_kb) * KB / GIB,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "loss": float(loss),
        "window_batch": window_batch_for(side),
        "trainable_params": sum(p.numel() for p in params),
        "params": sum(p.numel() for p in net.parameters()),
    }


def run(side: int, tokenizer: str, mode: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", str(side), tokenizer, mode, "--preset", args.preset]
    command += ["--threads", str(args.threads), "--memory-limit-gb", str(args.memory_limit_gb)]
    load = os.getloadavg()[0]
    try:
        # glibc's own malloc settings: what a step holds, not what a heap tuned for reuse keeps
        env = os.environ | {"HOLOHISTO_GLIBC_MALLOC": "1"}
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=args.timeout_s, cwd=REPO, env=env
        )
    except subprocess.TimeoutExpired:
        return {"failed": f"stopped after {args.timeout_s:.0f} s", "load": load}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        words = ("MemoryError", "DefaultCPUAllocator", "std::bad_alloc", "out of memory")
        failed = (
            f"exceeds the {args.memory_limit_gb:.0f} GB limit"
            if any(word in done.stderr for word in words)
            else done.stderr.strip()[-300:]
        )
        return {"failed": failed, "load": load}
    return {**json.loads(lines[-1]), "load": load}


def step_flops(preset: str, tokenizer: str, mode: str) -> tuple[int, int]:
    """(forward FLOPs, forward + backward + recomputation FLOPs) of one step on a FLOP_SIDE_PX patch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from custom.training import SegmentationLoss, aux_loss_of

    torch.manual_seed(0)
    net = build(preset, tokenizer, mode, window_batch_for(FLOP_SIDE_PX))
    images = torch.rand(1, 3, FLOP_SIDE_PX, FLOP_SIDE_PX)
    labels = (torch.rand(1, 1, FLOP_SIDE_PX, FLOP_SIDE_PX) > 0.8).long()
    with FlopCounterMode(display=False) as counter:
        loss = SegmentationLoss(aux_loss_of(net))(net(images), labels)
        forward = counter.get_total_flops()
        loss.backward()
    return forward, counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sides", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--tokenizer", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--modes", nargs="+", default=["off", "windows", "all"])
    parser.add_argument(
        "--skip", nargs="*", default=["2048:trainable:off"], help="SIDE:TOKENIZER:MODE runs left out"
    )
    parser.add_argument("--preset", default="full")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-limit-gb", type=float, default=14.0)
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument("--skip-flops", action="store_true")
    parser.add_argument("--flops-only", action="store_true")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # `custom` lives at the repository root, not beside this script
    if args.worker:
        print(json.dumps(worker(args)))
        return

    import torch

    print(
        f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    )
    print(
        f"{args.preset} net, batch 1, float32, {args.threads} torch thread(s), one step per fresh subprocess, "
        f"address-space limit {args.memory_limit_gb:.0f} GB; load average {os.getloadavg()} at start"
    )
    if not args.skip_flops:
        torch.set_num_threads(args.threads)
        scale = (TARGET_SIDE_PX / FLOP_SIDE_PX) ** 2
        print(f"\nTFLOPs per {TARGET_SIDE_PX} px step (counted at {FLOP_SIDE_PX} px, x{scale:.0f})")
        for tokenizer in args.tokenizer:
            counts = {mode: step_flops(args.preset, tokenizer, mode) for mode in CONFIGS[tokenizer]}
            forward = counts["off"][0]
            cells = [
                f"{mode}: +{(c[1] - counts['off'][1]) * scale / 1e12:.1f} ({(c[1] - counts['off'][1]) / forward:.0%})"
                for mode, c in counts.items()
                if mode != "off"
            ]
            print(
                f"  {tokenizer:9s} forward {forward * scale / 1e12:.1f}; recomputed in backward (share of the "
                "forward): " + ", ".join(cells),
                flush=True,
            )
        if args.flops_only:
            return

    rows = []
    for side in args.sides:
        for tokenizer in args.tokenizer:
            for mode in CONFIGS[tokenizer]:
                if mode not in args.modes or f"{side}:{tokenizer}:{mode}" in args.skip:
                    continue
                result = run(side, tokenizer, mode, args)
                rows.append((side, tokenizer, mode, result))
                print(f"  {side} {tokenizer} {mode}: {json.dumps(result)}", file=sys.stderr, flush=True)
    print(f"load average {os.getloadavg()} at the end")

    print(
        "\nconstant part, not in the peaks below (float32 weights; gradients and AdamW moments if trainable):"
    )
    for tokenizer in args.tokenizer:
        r = next((r for _, t, _, r in rows if t == tokenizer and "params" in r), None)
        if r:
            frozen = r["params"] - r["trainable_params"]
            print(f"  {tokenizer:9s} {(16 * r['trainable_params'] + 4 * frozen) / GIB:.2f} GiB")
    print(
        f"\n{'side':>5s} {'tokenizer':9s} {'ckpt':7s} {'win/batch':>9s} {'peak GiB':>9s} "
        f"{'x to 4K':>7s} {'4K GiB':>7s} {'wall s':>7s} {'cpu s':>7s} {'load':>5s}"
    )
    for side, tokenizer, mode, r in rows:
        scale = (TARGET_SIDE_PX / side) ** 2
        if "failed" in r:
            print(f"{side:5d} {tokenizer:9s} {mode:7s}  {r['failed']} (load {r['load']:.1f})")
            continue
        print(
            f"{side:5d} {tokenizer:9s} {mode:7s} {r['window_batch']:9d} {r['peak_gib']:9.2f} {scale:7.0f} "
            f"{r['peak_gib'] * scale:7.1f} {r['wall_s']:7.0f} {r['cpu_s']:7.0f} {r['load']:5.1f}"
        )
    measured = {(side, t, m): r["peak_gib"] for side, t, m, r in rows if "peak_gib" in r}
    sides = sorted({side for side, *_ in measured})
    if len(sides) >= 2:
        small, large = sides[0], sides[-1]
        print(
            f"\nlinear fit through {small} and {large} px (a constant part plus a part linear in pixels), at 4096 px:"
        )
        for tokenizer in args.tokenizer:
            for mode in CONFIGS[tokenizer]:
                if (small, tokenizer, mode) in measured and (large, tokenizer, mode) in measured:
                    a, b = measured[small, tokenizer, mode], measured[large, tokenizer, mode]
                    per_pixel = (b - a) / (large**2 - small**2)
                    constant = a - per_pixel * small**2
                    at_4k = constant + per_pixel * TARGET_SIDE_PX**2
                    print(f"  {tokenizer:9s} {mode:7s} {at_4k:6.1f} GiB (constant {constant:+.2f} GiB)")
    print("\ngoal at 4096 px (set_grad_checkpointing, activations): frozen <= 40 GiB, trainable <= 80 GiB")
    for side, tokenizer, mode, r in rows:
        if mode == "all" and "peak_gib" in r:
            at_4k = r["peak_gib"] * (TARGET_SIDE_PX / side) ** 2
            verdict = "met" if at_4k <= GOAL_GIB[tokenizer] else "NOT met"
            print(f"  from {side} px, {tokenizer}: {at_4k:.1f} GiB -> {verdict}")


if __name__ == "__main__":
    main()
