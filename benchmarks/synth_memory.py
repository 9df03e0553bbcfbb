"""Peak memory of writing synthetic slides of growing size: it must not grow with the slide.

    .venv/bin/python benchmarks/synth_memory.py [--sides 16384 65536] [--seed 0] [--out DIR]

Each side writes one square slide (slide pyramid, mask pyramid, sidecar) in a fresh subprocess,
with the same seed. Reported per slide:

- wall and cpu: seconds for the whole write (cpu: all threads of the process);
- Mpx/s: pixels of every level of the slide and its mask, per wall second;
- baseline: resident memory after the imports (torch and MONAI come in with `custom`);
- peak: peak resident memory during the write, and above the baseline (Linux VmHWM, reset through
  /proc/self/clear_refs just before the write, so import peaks do not count).

Then the ratio of peaks, largest slide over smallest: the goal is a ratio near 1. Nothing is
asserted; the machine (platform, CPU count, load) is printed with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from proc_memory import measured

REPO = Path(__file__).resolve().parents[1]


def worker(side_px: int, seed: int, out_dir: str) -> dict:
    """One slide, in its own process."""
    from custom.outputs.pyramid import pyramid_shapes
    from custom.synth import write_synthetic_slides

    with measured() as numbers:
        (result,) = write_synthetic_slides(
            out_dir, width=side_px, height=side_px, seed=seed, prefix="bench", progress=False
        )
    pixels = 2 * sum(h * w for h, w in pyramid_shapes(side_px, side_px))  # slide + mask
    return {
        "side_px": side_px,
        **numbers,
        "mpx_per_s": pixels / 1e6 / numbers["wall_s"],
        "slide_mb": result.wsi_path.stat().st_size / 1e6,
        "tissue_fraction": result.tissue_fraction,
        "n_glomeruli": result.n_glomeruli,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the slides (default: a temporary one)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.sides[0], args.seed, str(args.out))))
        return

    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"python {platform.python_version()}, load average at start {os.getloadavg()[0]:.2f}")
    header = f"{'side':>7} {'wall s':>8} {'cpu s':>8} {'Mpx/s':>7} {'base MB':>8} {'peak MB':>8} {'peak-base MB':>13} {'slide MB':>9} {'tissue':>7} {'gloms':>6}"
    print(header)
    rows = []
    with tempfile.TemporaryDirectory(prefix="synth_memory_") as tmp:
        for side in args.sides:
            out = args.out or Path(tmp)
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--sides",
                str(side),
                "--seed",
                str(args.seed),
                "--out",
                str(out),
            ]
            done = subprocess.run(
                cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
            )
            if done.returncode != 0:
                print(f"{side:>7} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(
                f"{side:>7} {r['wall_s']:8.1f} {r['cpu_s']:8.1f} {r['mpx_per_s']:7.1f} {r['baseline_mb']:8.0f} "
                f"{r['peak_mb']:8.0f} {r['peak_above_baseline_mb']:13.0f} {r['slide_mb']:9.0f} "
                f"{r['tissue_fraction']:7.0%} {r['n_glomeruli']:6d}"
            )
            if args.out is None:
                for f in Path(tmp).iterdir():
                    f.unlink()  # the next slide need not share the disk with this one
    if len(rows) >= 2:
        small, large = rows[0], rows[-1]
        area = (large["side_px"] / small["side_px"]) ** 2
        print(
            f"{large['side_px']} vs {small['side_px']} ({area:.0f}x the pixels): peak ratio "
            f"{large['peak_mb'] / small['peak_mb']:.2f} (total), "
            f"{large['peak_above_baseline_mb'] / max(small['peak_above_baseline_mb'], 1e-9):.2f} (above baseline); goal: near 1"
        )


if __name__ == "__main__":
    main()
