"""Streaming whole-slide Dice against whole-array numpy Dice: peak memory and time.

    .venv/bin/python benchmarks/wsi_dice_memory.py [--stream-side 80000] [--numpy-side 20000] [--out DIR]

Writes a square truth mask and a prediction mask per side (level 0 only, LZW, 256-px tiles:
discs of 500 px radius every 2,500 px, the prediction's discs 480 px and shifted by (40, -30) px),
then scores each pair in a fresh subprocess with:

- stream: `custom.metrics.wsi.wsi_dice_counts`, 4096-px blocks of both masks at a time;
- grid: `custom.metrics.patches.count_grid`, the same pass keeping counts per 4096-px patch (what
  `custom.metrics.evaluate` runs, giving patch-level and whole-slide Dice at once);
- numpy: both masks read whole into memory, then one numpy Dice (only at the side that fits).

Reported per run: wall and cpu seconds, Mpx/s (pixels of both masks per wall second), resident
memory after the imports (baseline) and the peak during the scoring (Linux VmHWM, reset through
/proc/self/clear_refs just before it), and the Dice (all methods agree at the shared side). Then
the ratios. Nothing is asserted; the machine and its load are printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from proc_memory import measured

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `custom` lives in the repository root
SPACING_PX = 2500  # disc centre spacing
RADIUS_PX = {"truth": 500, "pred": 480}
SHIFT_PX = {"truth": (0, 0), "pred": (40, -30)}  # (y, x) of the prediction's disc centres
MPP = 0.25


def disc_tiles(kind: str):
    """tile_source(level, y, x, h, w) of a disc lattice: each pixel looks at its nearest centre only."""
    radius2 = RADIUS_PX[kind] ** 2
    dy0, dx0 = SHIFT_PX[kind]

    def offsets(start: int, count: int, shift: int) -> np.ndarray:
        coord = np.arange(start, start + count) - SPACING_PX // 2 - shift
        return coord - SPACING_PX * np.round(coord / SPACING_PX)

    def tile_source(level, y, x, h, w):
        dy, dx = offsets(y, h, dy0), offsets(x, w, dx0)
        return ((dy[:, None] ** 2 + dx[None, :] ** 2) <= radius2).astype(np.uint8)

    return tile_source


def write_masks(out_dir: Path, side_px: int) -> tuple[Path, Path]:
    from custom.outputs.pyramid import write_pyramid

    paths = []
    for kind in ("pred", "truth"):
        path = out_dir / f"discs_{side_px}_{kind}.tiff"
        if not path.exists():
            write_pyramid(
                path, [(side_px, side_px)], disc_tiles(kind), channels=1, mpp=MPP, compression="lzw"
            )
        paths.append(path)
    return paths[0], paths[1]


def worker(method: str, pred: str, truth: str) -> dict:
    """One scoring run, in its own process."""
    from custom.metrics.dice import DiceCounts
    from custom.metrics.patches import count_grid
    from custom.metrics.wsi import wsi_dice_counts
    from custom.wsi.reader import open_mask

    pred_mask, truth_mask = open_mask(pred), open_mask(truth)
    side = pred_mask.level_shapes[0][0]
    with measured() as numbers:
        if method == "stream":
            dice = wsi_dice_counts(pred_mask, truth_mask).mean()
        elif method == "grid":
            dice = count_grid(pred_mask, truth_mask, cell_px=4096).total().mean()
        else:
            p = pred_mask.read_level(0, max_pixels=side * side)
            g = truth_mask.read_level(0, max_pixels=side * side)
            counts = DiceCounts()
            counts.add(p, g)
            dice = counts.dice()
    return {
        "method": method,
        "side_px": side,
        "dice": dice,
        **numbers,
        "mpx_per_s": 2 * side * side / 1e6 / numbers["wall_s"],
    }


def run_worker(method: str, pred: Path, truth: Path) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", method, str(pred), str(truth)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(f"{method} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream-side", type=int, default=80_000, help="side of the large pair (px)")
    parser.add_argument("--numpy-side", type=int, default=20_000, help="side of the pair numpy holds whole")
    parser.add_argument("--out", type=Path, default=None, help="folder for the masks (default: temporary)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return

    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"python {platform.python_version()}, load average at start {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="wsi_dice_memory_") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        runs = []
        for side, methods in (
            (args.numpy_side, ("numpy", "stream", "grid")),
            (args.stream_side, ("stream", "grid")),
        ):
            started = time.perf_counter()
            pred, truth = write_masks(out, side)
            size_mb = (pred.stat().st_size + truth.stat().st_size) / 1e6
            print(
                f"{side} x {side} masks: {size_mb:.0f} MB on disk, written in {time.perf_counter() - started:.0f} s"
            )
            for method in methods:
                r = run_worker(method, pred, truth)
                if r is not None:
                    runs.append(r)
    header = f"{'method':>7} {'side':>7} {'Dice':>8} {'wall s':>8} {'cpu s':>8} {'Mpx/s':>7} {'base MB':>8} {'peak MB':>8} {'peak-base MB':>13}"
    print(header)
    for r in runs:
        print(
            f"{r['method']:>7} {r['side_px']:>7} {r['dice']:8.5f} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} "
            f"{r['mpx_per_s']:7.1f} {r['baseline_mb']:8.0f} {r['peak_mb']:8.0f} {r['peak_above_baseline_mb']:13.0f}"
        )
    by = {(r["method"], r["side_px"]): r for r in runs}
    numpy_run = by.get(("numpy", args.numpy_side))
    area = (args.stream_side / args.numpy_side) ** 2
    for method in ("stream", "grid"):
        small, large = by.get((method, args.numpy_side)), by.get((method, args.stream_side))
        if numpy_run and large:
            print(
                f"{method} at {args.stream_side} ({area:.0f}x the pixels) vs numpy at {args.numpy_side}: "
                f"peak above baseline {large['peak_above_baseline_mb']:.0f} MB vs "
                f"{numpy_run['peak_above_baseline_mb']:.0f} MB (numpy / {method} = "
                f"{numpy_run['peak_above_baseline_mb'] / max(large['peak_above_baseline_mb'], 1e-9):.1f}x; "
                f"numpy at {args.stream_side} would need ~{numpy_run['peak_above_baseline_mb'] * area / 1024:.1f} GB)"
            )
        if small and large:
            print(
                f"{method}: {args.stream_side} vs {args.numpy_side}: peak above baseline ratio "
                f"{large['peak_above_baseline_mb'] / max(small['peak_above_baseline_mb'], 1e-9):.2f} (goal: near 1), "
                f"time ratio {large['wall_s'] / small['wall_s']:.1f} (pixel ratio {area:.0f})"
            )
        if numpy_run and small:
            print(
                f"{method} vs numpy at {args.numpy_side}: Dice {small['dice']:.6f} vs {numpy_run['dice']:.6f}, "
                f"time {small['wall_s']:.1f} s vs {numpy_run['wall_s']:.1f} s"
            )


if __name__ == "__main__":
    main()
