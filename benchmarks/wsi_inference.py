"""Whole-slide inference: efficiency, tissue-proportional time, and memory that does not grow with the slide.

One run, tiny network on CPU, synthetic slides made here:
  efficiency   wall time of `segment_slide` (read, tile, infer, stitch, write mask/GeoJSON/overlay)
               divided by the network alone on the very same tiles, already in memory. Goal <= 1.15.
  tissue       two slides of the same size, the second with 3/4 of its tissue replaced by glass:
               the time ratio should follow the tissue ratio, not the (equal) slide sizes.
  memory       peak RSS of segmenting a 20k x 20k and an 80k x 80k slide, each in a fresh
               subprocess. Goal: ratio <= 1.2. The 80k slide tiles a 20k synthetic slide 4 x 4.

    python benchmarks/wsi_inference.py [--checkpoint DEMO_OUT/model.pt] [--skip-memory] [--level 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `custom` lives in the repository root

from custom.checkpoints import config_from_checkpoint, load_weights  # noqa: E402
from custom.data.tiling import TissueTileSplitter  # noqa: E402
from custom.networks import build_network, holohisto_tiny  # noqa: E402
from custom.segment import WholeSlideInferer, segment_slide, unit_float  # noqa: E402
from custom.synth import write_synthetic_slides  # noqa: E402
from custom.wsi.pyramid import pyramid_shapes, write_pyramid  # noqa: E402
from custom.wsi.reader import open_slide  # noqa: E402

TILE_PX = 512
GLASS_RGB = (242, 240, 244)


CHECKPOINT: str | None = None  # a trained model (--checkpoint); random weights without one


def network(seed=0):
    """The tiny net: trained weights when given (realistic masks), else random ones.

    Random weights predict speckled masks with thousands of objects, which inflates the cleanup and
    GeoJSON share of the wall time well beyond what a trained model's masks cost.
    """
    torch.manual_seed(seed)
    if CHECKPOINT:
        net = build_network(config_from_checkpoint(CHECKPOINT), load_tokenizer_checkpoint=False)
        return load_weights(net, CHECKPOINT).eval()
    return holohisto_tiny().eval()


def derived_slide(source: Path, out: Path, side: int | None = None, keep_box=None) -> Path:
    """A new pyramid from `source`: tiled to `side` x `side`, or with tissue outside `keep_box` turned to glass."""
    src = open_slide(source)
    h0, w0 = src.level_shapes[0]
    height, width = (side, side) if side else (h0, w0)

    def tile_source(level, y, x, h, w):
        f = 2**level
        if side:  # wrap around the source slide, reading the same level
            return wrapped_read(src, level, y, x, h, w)
        block = src.read_region((y * f, x * f), (h, w), level=level)
        y0, x0, y1, x1 = (v // f for v in keep_box)
        outside = np.ones((h, w), bool)
        outside[max(0, y0 - y) : max(0, y1 - y), max(0, x0 - x) : max(0, x1 - x)] = False
        block[outside] = GLASS_RGB
        return block

    shapes = pyramid_shapes(height, width)
    return write_pyramid(out, shapes, tile_source, channels=3, mpp=src.mpp[1], compression="jpeg")


def wrapped_read(src, level, y, x, h, w):
    """Region (y, x, h, w) of the source level repeated periodically in both directions.

    Levels coarser than the source's last one subsample that last level (nearest pixel): they only
    feed thumbnails, and the big slide has more levels than its source.
    """
    last = len(src.level_shapes) - 1
    if level > last:
        f = 2 ** (level - last)
        return wrapped_read(src, last, y * f, x * f, h * f, w * f)[::f, ::f]
    lh, lw = src.level_shapes[level]
    f = 2**level
    out = np.empty((h, w, 3), np.uint8)
    row = 0
    while row < h:
        sy = (y + row) % lh
        rows = min(h - row, lh - sy)
        col = 0
        while col < w:
            sx = (x + col) % lw
            cols = min(w - col, lw - sx)
            out[row : row + rows, col : col + cols] = src.read_region(
                (sy * f, sx * f), (rows, cols), level=level
            )
            col += cols
        row += rows
    return out


def efficiency(slide: Path, level: int, out: Path) -> None:
    net = network()
    splitter = TissueTileSplitter(patch_size=TILE_PX, level=level, progress=False)
    inferer = WholeSlideInferer(splitter, batch_size=4)
    start = time.perf_counter()
    outcome = segment_slide(str(slide), out, net, inferer, progress=False)
    wall = time.perf_counter() - start
    plan = splitter.plan(str(slide))
    tiles = [
        torch.from_numpy(
            plan.slide.read_region((y * 2**level, x * 2**level), (TILE_PX, TILE_PX), level)
            .transpose(2, 0, 1)
            .copy()
        )
        for y, x in plan.locations
    ]
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tiles), 4):
            net(unit_float(torch.stack(tiles[i : i + 4])))
    net_only = time.perf_counter() - start
    print(
        f"efficiency: {outcome.tissue_tiles} tissue tiles of {plan.grid_tiles}; whole slide {wall:.1f} s, "
        f"network alone {net_only:.1f} s -> ratio {wall / net_only:.3f} (goal <= 1.15)"
    )


def tissue_proportional(full: Path, quarter: Path, level: int, out: Path) -> None:
    times, tiles = {}, {}
    for name, slide in (("full tissue", full), ("1/4 tissue", quarter)):
        splitter = TissueTileSplitter(patch_size=TILE_PX, level=level, progress=False)
        start = time.perf_counter()
        outcome = segment_slide(
            str(slide), out, network(), WholeSlideInferer(splitter, batch_size=4), progress=False
        )
        times[name], tiles[name] = time.perf_counter() - start, outcome.tissue_tiles
        print(f"tissue: {name:11s} {tiles[name]:5d} tissue tiles, {times[name]:.1f} s")
    print(
        f"tissue: tile ratio {tiles['full tissue'] / tiles['1/4 tissue']:.2f}x, "
        f"time ratio {times['full tissue'] / times['1/4 tissue']:.2f}x, slide-area ratio 1.00x"
    )


def memory_worker(slide: str, level: int, out: str) -> None:
    splitter = TissueTileSplitter(patch_size=TILE_PX, level=level, progress=False)
    start = time.perf_counter()
    outcome = segment_slide(slide, out, network(), WholeSlideInferer(splitter, batch_size=4), progress=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"tiles": outcome.tissue_tiles, "seconds": time.perf_counter() - start, "peak_mb": peak_mb}
        )
    )


def memory(small: Path, big: Path, level: int, out: Path) -> None:
    results = {}
    for name, slide in (("20k", small), ("80k", big)):
        run = subprocess.run(
            [sys.executable, __file__, "--worker", str(slide), "--level", str(level), "--out", str(out),
             *(["--checkpoint", CHECKPOINT] if CHECKPOINT else [])],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        r = results[name]
        print(
            f"memory: {name} slide, {r['tiles']} tissue tiles, {r['seconds']:.0f} s, peak RSS {r['peak_mb']:.0f} MB"
        )
    print(
        f"memory: peak RSS ratio 80k / 20k = {results['80k']['peak_mb'] / results['20k']['peak_mb']:.3f} (goal <= 1.2)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--level", type=int, default=1, help="inference level (tiny trains at level 1)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the 20k vs 80k memory part")
    parser.add_argument(
        "--checkpoint", help="a trained tiny model.pt (e.g. the demo's); default: random weights"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global CHECKPOINT
    CHECKPOINT = args.checkpoint
    if args.worker:
        return memory_worker(args.worker, args.level, args.out)
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; tiny net ({CHECKPOINT or 'random weights'}), "
        f"{TILE_PX}-px tiles at level {args.level}; load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (base,) = write_synthetic_slides(tmp, count=1, width=16384, height=12288, seed=50, progress=False)
        efficiency(base.wsi_path, args.level, tmp / "out")
        h, w = open_slide(base.wsi_path).level_shapes[0]
        quarter = derived_slide(base.wsi_path, tmp / "quarter_wsi.tiff", keep_box=(0, 0, h // 2, w // 2))
        tissue_proportional(base.wsi_path, quarter, args.level, tmp / "out")
        if not args.skip_memory:
            (small,) = write_synthetic_slides(
                tmp, count=1, width=20480, height=20480, seed=51, progress=False
            )
            big = derived_slide(small.wsi_path, tmp / "big_wsi.tiff", side=81920)
            memory(small.wsi_path, big, args.level, tmp / "out")


if __name__ == "__main__":
    main()
