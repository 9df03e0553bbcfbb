"""How the tiny HoloHisto net's CPU time and memory grow with the input side, linear vs softmax attention.

    .venv/bin/python benchmarks/scaling.py [--sides 512 1024 2048 4096] [--rounds 3] [--runs 2] [--threads N]
        [--preset tiny|fast|full]

Every measurement is a fresh subprocess: build the net (tiny unless `--preset` says otherwise; eval),
allocate the input (batch 1, random [0, 1] RGB), run the forward pass under torch.no_grad once to warm up, then `--runs` timed
passes. All configurations are measured once per round, `--rounds` times, so a burst of load from
another job on a shared machine lands on every configuration alike rather than on one. Reported:

- wall: median wall-clock seconds over all timed passes of all rounds;
- cpu: the same for the process's CPU seconds (all threads, user + system);
- peak: the forward passes' peak resident memory above the resident memory just before them
  (Linux: VmHWM after resetting it through /proc/self/clear_refs, so import and build peaks do
  not count, nor does the input tensor, allocated before), median over rounds.

A configuration whose warm-up pass exceeds SINGLE_PASS_AFTER_S is timed by that pass alone and
not repeated in later rounds; one that exceeds --timeout-s or --memory-limit-gb (the address-space
limit of its subprocess, which protects a shared machine) is reported as such. Then the growth per
4x pixels (each doubling of the side) and the goal: linear attention at most 4.4x per 4x pixels
from 1024 to 4096, time and memory. Last, parameters and GFLOPs (torch FlopCounterMode on the meta
device: convolutions, matrix products and attention; norms and activations are not counted) per
4096 x 4096 patch, for the full, fast and tiny nets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from proc_memory import KB_PER_MB, reset_peak, status_kb

REPO = Path(__file__).resolve().parents[1]
ATTENTIONS = ("linear", "softmax")
FLOP_SIDE_PX = 4096
GOAL_GROWTH_PER_4X_PIXELS = 4.4
GOAL_FROM_SIDE_PX = 1024
BYTES_PER_GB = 1024**3
# A pass this slow is timed once: repeating softmax attention at 4K would add minutes, not information.
SINGLE_PASS_AFTER_S = 20.0


def worker(
    attention: str, side_px: int, runs: int, memory_limit_gb: float, threads: int | None, preset: str = "tiny"
) -> dict:
    """One configuration in its own process: timings of each pass and the peak memory."""
    limit_bytes = int(memory_limit_gb * BYTES_PER_GB)
    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    import torch

    from custom.networks import build_network

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_network({"name": "holohisto", "preset": preset, "attention": attention}).eval()
    images = torch.rand(1, 3, side_px, side_px)
    reset_peak()
    rss_before_kb = status_kb("VmRSS")
    wall, cpu = [], []
    with torch.no_grad():
        for _ in range(runs + 1):
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            model(images)
            wall.append(time.perf_counter() - wall_start)
            cpu.append(time.process_time() - cpu_start)
            if wall[0] > SINGLE_PASS_AFTER_S:
                break
    timed = slice(1, None) if len(wall) > 1 else slice(0, 1)
    return {
        "wall_s": wall[timed],
        "cpu_s": cpu[timed],
        "peak_mb": (status_kb("VmHWM") - rss_before_kb) / KB_PER_MB,
    }


def run_config(attention: str, side_px: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", attention, str(side_px), "--runs", str(args.runs)]
    command += ["--memory-limit-gb", str(args.memory_limit_gb), "--preset", args.preset]
    command += ["--threads", str(args.threads)] if args.threads else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"failed": f"stopped after {args.timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        out_of_memory = any(
            word in done.stderr for word in ("MemoryError", "DefaultCPUAllocator", "std::bad_alloc")
        )
        reason = (
            f"exceeds the {args.memory_limit_gb:.0f} GB limit"
            if out_of_memory
            else done.stderr.strip()[-300:]
        )
        return {"failed": reason}
    return json.loads(lines[-1])


def measure(args: argparse.Namespace) -> dict[str, dict[int, dict]]:
    samples = {a: {s: {"wall_s": [], "cpu_s": [], "peak_mb": []} for s in args.sides} for a in args.attention}
    failed: dict[tuple[str, int], str] = {}
    for round_index in range(args.rounds):
        for attention in args.attention:
            for side_px in args.sides:
                entry = samples[attention][side_px]
                if (attention, side_px) in failed or (
                    entry["wall_s"] and min(entry["wall_s"]) > SINGLE_PASS_AFTER_S
                ):
                    continue
                result = run_config(attention, side_px, args)
                if "failed" in result:
                    failed[attention, side_px] = result["failed"]
                    continue
                entry["wall_s"] += result["wall_s"]
                entry["cpu_s"] += result["cpu_s"]
                entry["peak_mb"].append(result["peak_mb"])
                print(
                    f"  round {round_index + 1}: {attention} {side_px} px done", file=sys.stderr, flush=True
                )
    table: dict[str, dict[int, dict]] = {}
    for attention, by_side in samples.items():
        table[attention] = {}
        for side_px, entry in by_side.items():
            if (attention, side_px) in failed:
                table[attention][side_px] = {"failed": failed[attention, side_px]}
            else:
                table[attention][side_px] = {key: statistics.median(values) for key, values in entry.items()}
                table[attention][side_px]["passes"] = len(entry["wall_s"])
    return table


def growth(results: dict[int, dict], key: str, small: int, large: int) -> float | None:
    a, b = results[small].get(key), results[large].get(key)
    return b / a if a and b else None


def model_cost() -> list[str]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from custom.networks import holohisto_fast, holohisto_full, holohisto_tiny

    lines = []
    for name, factory in (("full", holohisto_full), ("fast", holohisto_fast), ("tiny", holohisto_tiny)):
        for attention in ATTENTIONS:
            with torch.device("meta"):
                model = factory(attention=attention).eval()
                images = torch.empty(1, 3, FLOP_SIDE_PX, FLOP_SIDE_PX)
            params = sum(p.numel() for p in model.parameters())
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(images)
            tokenizer = sum(counter.get_flop_counts().get(f"{type(model).__name__}.tokenizer", {}).values())
            lines.append(
                f"  {name:4s} {attention:7s}  params {params / 1e6:7.3f} M  "
                f"{counter.get_total_flops() / 1e9:9.1f} GFLOPs (tokenizer {tokenizer / 1e9:.1f})"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--attention", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--runs", type=int, default=2, help="timed passes per subprocess, after one warm-up pass"
    )
    parser.add_argument("--threads", type=int, help="torch threads in each run (default: torch's choice)")
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--memory-limit-gb", type=float, default=16.0)
    parser.add_argument("--skip-cost", action="store_true", help="leave out the params / GFLOPs table")
    parser.add_argument("--preset", default="tiny", help="the net timed: tiny (default), fast or full")
    parser.add_argument("--worker", nargs=2, metavar=("ATTENTION", "SIDE_PX"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))  # `custom` lives at the repository root, not beside this script
    if args.worker:
        print(
            json.dumps(
                worker(
                    args.worker[0],
                    int(args.worker[1]),
                    args.runs,
                    args.memory_limit_gb,
                    args.threads,
                    args.preset,
                )
            )
        )
        return

    import torch

    threads = args.threads or torch.get_num_threads()
    print(f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"torch {torch.__version__}, {threads} threads; load average {os.getloadavg()[0]:.2f} at start")
    print(
        f"{args.preset} net, batch 1, eval, torch.no_grad; {args.rounds} rounds x (fresh subprocess, warm-up, "
        f"{args.runs} timed passes); medians over all passes"
    )
    table = measure(args)
    print(f"\n{'attention':9s} {'side':>5s} {'wall s':>8s} {'cpu s':>8s} {'peak MB':>9s} {'passes':>7s}")
    for attention, results in table.items():
        for side_px, r in results.items():
            if "failed" in r:
                print(f"{attention:9s} {side_px:5d}  {r['failed']}")
            else:
                print(
                    f"{attention:9s} {side_px:5d} {r['wall_s']:8.2f} {r['cpu_s']:8.2f} {r['peak_mb']:9.0f} {r['passes']:7d}"
                )
    steps = list(zip(args.sides, args.sides[1:], strict=False))
    print(
        f"\ngrowth per 4x pixels (goal, linear attention from {GOAL_FROM_SIDE_PX} px: <= {GOAL_GROWTH_PER_4X_PIXELS}x)"
    )
    for attention, results in table.items():
        for key, label in (("wall_s", "wall"), ("cpu_s", "cpu"), ("peak_mb", "peak")):
            cells = []
            for small, large in steps:
                ratio = growth(results, key, small, large)
                cells.append(f"{small}->{large}: " + (f"{ratio:5.2f}x" if ratio else "  n/a"))
            print(f"  {attention:8s} {label:5s} " + "   ".join(cells))
    if "linear" in table:
        goal_steps = [(a, b) for a, b in steps if a >= GOAL_FROM_SIDE_PX]
        for key in ("wall_s", "cpu_s", "peak_mb"):
            ratios = [growth(table["linear"], key, a, b) for a, b in goal_steps]
            if not goal_steps or not all(ratios):
                print(f"  goal, linear {key:7s}: not measurable with these sides")
                continue
            verdict = "met" if max(ratios) <= GOAL_GROWTH_PER_4X_PIXELS else "NOT met"
            print(f"  goal, linear {key:7s}: worst {max(ratios):.2f}x per 4x pixels -> {verdict}")
    if not args.skip_cost:
        print(f"\nmodel cost per {FLOP_SIDE_PX} x {FLOP_SIDE_PX} patch (batch 1)")
        for line in model_cost():
            print(line)


if __name__ == "__main__":
    main()
