"""Whole-slide inference speed and memory, side by side in one run, with the machine noted.

speed    (a) on one 16,384 x 12,288 synthetic slide with the same model and tile size:
             `segment_slide` (read, tile, infer, stitch, clean, write every output) against the
             network alone on the very same tiles already in memory, against the network's own
             passes inside it, and against MONAI's own pipeline (PatchInferer +
             WSISlidingWindowSplitter(reader="cuCIM") + AvgMerger, the 20 lines a MONAI user would
             write) at no overlap and at ours. Interleaved rounds, medians (`--rounds`).
commands (a) the whole commands as a user runs them, each in a fresh process: `python -m custom
             segment` against a script running MONAI's pipeline, on that slide (85 % tissue) and on
             the same slide with its right half turned to glass (41 % tissue).
null     (b) the pipeline's own throughput with a network that costs nothing, at level 0 with
             4096-px tiles: tissue megapixels per second per core (the full net on an H200
             consumes ~42 Mpx/s, 2.5 4K tiles/s).
memory   (c) peak RSS of segmenting a 20k x 20k and an 80k x 80k slide, each in a fresh process
             (`--memory-level 3` reads both at 1/8, where the 80k slide is ~400 tiles, not ~11,000).
tissue   (d) two slides of the same size, the second with 3/4 of its tissue turned to glass.

  python benchmarks/wsi_inference.py --checkpoint runs/demo/model.pt [--parts speed commands null memory tissue] [--rounds 3]
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

from custom.checkpoints import config_from_checkpoint, load_weights, read_checkpoint  # noqa: E402
from custom.data.scale import level_for_item  # noqa: E402
from custom.inference.inferer import WholeSlideInferer  # noqa: E402
from custom.inference.segment import segment_slide  # noqa: E402
from custom.inference.splitter import TissueTileSplitter  # noqa: E402
from custom.io import GLIBC_MALLOC_ENV  # noqa: E402
from custom.networks import build_network, holohisto_tiny  # noqa: E402
from custom.outputs.pyramid import pyramid_shapes, write_pyramid  # noqa: E402
from custom.synth import write_synthetic_slides  # noqa: E402
from custom.wsi.reader import open_slide  # noqa: E402

GLASS_RGB = (242, 240, 244)
BATCH = 4
SEED = 4242  # the held-out 16k x 12k slide of the stitching benchmark
OVERLAP_PX = 128  # inference.json's default


def network(checkpoint: str | None):
    """The tiny net: trained weights when given (realistic masks), else random ones."""
    torch.manual_seed(0)
    if checkpoint:
        net = build_network(config_from_checkpoint(checkpoint), load_tokenizer_checkpoint=False)
        return load_weights(net, checkpoint).eval()
    return holohisto_tiny().eval()


def trained_input(checkpoint: str | None, slide: str | Path) -> tuple[int, int]:
    """(tile side, slide level) the checkpoint was trained at, the level resolved on `slide` as inference does.

    Without a checkpoint: the tiny preset's 512 px at level 1.
    """
    config = read_checkpoint(checkpoint).get("input_config", {}) if checkpoint else {"patch_level": 1}
    with open_slide(slide) as src:
        level = level_for_item(src, {"image": str(slide)}, config.get("patch_level"), config.get("patch_mpp"))
    return config.get("patch_size", [512, 512])[0], level


class NullNet(torch.nn.Module):
    """A network that costs nothing: background logits of the input's size."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(x.shape[0], 2, *x.shape[2:])
        out[:, 0] = 1.0
        return out


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

    return write_pyramid(
        out, pyramid_shapes(height, width), tile_source, channels=3, mpp=src.mpp[1], compression="jpeg"
    )


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


def ours(slide: Path, net, tile: int, level: int, overlap: int, out: Path):
    splitter = TissueTileSplitter(patch_size=tile, overlap=overlap, level=level, progress=False)
    inferer = WholeSlideInferer(splitter, batch_size=BATCH)
    outcome = segment_slide(str(slide), out, net, inferer, progress=False)
    return outcome, splitter.plan(str(slide))


def network_alone(net, plan) -> float:
    """The network on exactly the pipeline's tiles, batched the same, read into memory first."""
    ds, size = plan.downsample, plan.tile_size
    tiles = [
        torch.from_numpy(
            plan.slide.read_region((round(y * ds), round(x * ds)), size, plan.level).transpose(2, 0, 1).copy()
        )
        for y, x in plan.locations
    ]
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tiles), BATCH):
            net(torch.stack(tiles[i : i + BATCH]).float().div_(255.0))
    return time.perf_counter() - start


def monai_native(slide: Path, net, tile: int, level: int, overlap: int) -> tuple[float, int]:
    """MONAI's own whole-slide pipeline, as its docs compose it: every grid tile, averaged, argmax."""
    from monai.inferers import AvgMerger, PatchInferer, WSISlidingWindowSplitter

    splitter = WSISlidingWindowSplitter(patch_size=tile, overlap=overlap, reader="cuCIM", level=level)
    tiles = 0

    def run(batch):
        nonlocal tiles
        tiles += batch.shape[0]
        return net(batch.float() / 255.0)

    inferer = PatchInferer(
        splitter=splitter,
        merger_cls=AvgMerger,
        batch_size=BATCH,
        postprocessing=lambda x: torch.softmax(x, 1),
    )
    start = time.perf_counter()
    with torch.inference_mode():
        merged = inferer(str(slide), run)
        labels = merged.argmax(1).to(torch.uint8)
    del merged, labels
    return time.perf_counter() - start, tiles


class TimedNet(torch.nn.Module):
    """The network, with the seconds spent in its forward passes summed (the share of `segment` it is)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seconds = net, 0.0

    def forward(self, x):
        start = time.perf_counter()
        out = self.net(x)
        self.seconds += time.perf_counter() - start
        return out


def median(values) -> float:
    return float(np.median(values))


def part_speed(slide: Path, checkpoint: str | None, work: Path, rounds: int) -> dict:
    """(a) in one process, in `rounds` interleaved rounds: the VM's speed drifts by up to ~30 % from
    one minute to the next, so every figure is the median of its rounds and every ratio the median
    of its rounds' ratios."""
    net = network(checkpoint)
    tile, level = trained_input(checkpoint, slide)
    overlap = OVERLAP_PX
    runs = {"segment": [], "network_inside": [], "alone": [], "monai_same": [], "monai_zero": []}
    for _ in range(rounds):
        timed = TimedNet(net)
        outcome, plan = ours(slide, timed, tile, level, overlap, work / "ours")
        runs["segment"].append(outcome.seconds)
        runs["network_inside"].append(timed.seconds)
        runs["alone"].append(network_alone(net, plan))
        seconds, monai_tiles_same = monai_native(slide, net, tile, level, overlap)
        runs["monai_same"].append(seconds)
        seconds, monai_tiles_zero = monai_native(slide, net, tile, level, 0)
        runs["monai_zero"].append(seconds)
        print("speed:   round " + "  ".join(f"{k} {v[-1]:.1f} s" for k, v in runs.items()), flush=True)
    seg = median(runs["segment"])
    ratio = {
        name: median([s / o for s, o in zip(runs["segment"], runs[name], strict=True)])
        for name in ("network_inside", "alone", "monai_same", "monai_zero")
    }
    print(
        f"speed: {outcome.tissue_tiles} tissue tiles of {plan.grid_tiles} ({tile} px, overlap {overlap}, level {level}), "
        f"tissue {plan.tissue.fraction:.0%} of the slide, medians of {rounds} rounds\n"
        f"speed:   segment {seg:.1f} s  vs network alone {median(runs['alone']):.1f} s  -> {ratio['alone']:.3f}x (goal <= 1.25 on a CPU)\n"
        f"speed:   the network's own passes inside segment: {median(runs['network_inside']):.1f} s -> segment is {ratio['network_inside']:.3f}x them\n"
        f"speed:   stages of the last round {json.dumps(outcome.timings)}\n"
        f"speed:   MONAI native, overlap {overlap}: {median(runs['monai_same']):.1f} s for {monai_tiles_same} tiles -> ours {ratio['monai_same']:.3f}x\n"
        f"speed:   MONAI native, overlap 0: {median(runs['monai_zero']):.1f} s for {monai_tiles_zero} tiles -> ours {ratio['monai_zero']:.3f}x",
        flush=True,
    )
    return {
        "tiles": outcome.tissue_tiles,
        "grid_tiles": plan.grid_tiles,
        "tissue_fraction": plan.tissue.fraction,
        "rounds": runs,
        "segment_s": seg,
        "network_alone_s": median(runs["alone"]),
        "ratio_network": ratio["alone"],
        "ratio_network_inside": ratio["network_inside"],
        "ratio_monai_same": ratio["monai_same"],
        "ratio_monai_zero": ratio["monai_zero"],
        "stages": outcome.timings,
    }


def part_commands(name: str, slide: Path, checkpoint: str | None, work: Path, rounds: int) -> dict:
    """The whole commands as a user runs them, each in a fresh process, in interleaved rounds:
    `python -m custom segment` against a script running MONAI's pipeline at our overlap and at none."""
    overlap = OVERLAP_PX
    env = os.environ | {"PYTHONPATH": str(REPO)}
    ckpt = ["--checkpoint", checkpoint] if checkpoint else []
    monai = [sys.executable, __file__, "--monai-worker", str(slide), *ckpt, "--overlap"]
    commands = {  # name: (command, malloc settings)
        "segment": ([sys.executable, "-m", "custom", "segment", str(slide), "--out", str(work / "cli"), "--overwrite", *ckpt], "0"),
        "monai_overlap": ([*monai, str(overlap)], "0"),
        "monai_zero": ([*monai, "0"], "0"),
        # the script as a MONAI user writes it gets glibc's defaults (importing `custom` tunes them)
        "monai_overlap_glibc": ([*monai, str(overlap)], "1"),
    }  # fmt: skip
    runs = {k: [] for k in commands}
    for _ in range(rounds):
        for key, (cmd, glibc) in commands.items():
            start = time.perf_counter()
            subprocess.run(
                cmd, check=True, capture_output=True, env=env | {GLIBC_MALLOC_ENV: glibc}, cwd=REPO
            )
            runs[key].append(time.perf_counter() - start)
    tile, level = trained_input(checkpoint, slide)
    plan = TissueTileSplitter(patch_size=tile, overlap=overlap, level=level, progress=False).plan(str(slide))
    fraction, tissue_tiles = plan.tissue.fraction, plan.tissue_tiles
    plan.slide.close()
    ratio = {
        key: median([s / o for s, o in zip(runs["segment"], runs[key], strict=True)])
        for key in ("monai_overlap", "monai_zero", "monai_overlap_glibc")
    }
    print(
        f"commands ({name}: tissue {fraction:.0%} of the slide, {tissue_tiles} tissue tiles; fresh processes, medians of {rounds} rounds): "
        f"segment {median(runs['segment']):.1f} s, MONAI overlap {overlap} {median(runs['monai_overlap']):.1f} s, "
        f"MONAI overlap 0 {median(runs['monai_zero']):.1f} s -> {ratio['monai_overlap']:.3f}x and {ratio['monai_zero']:.3f}x (goal <= 0.6); "
        f"MONAI overlap {overlap} with glibc's malloc defaults {median(runs['monai_overlap_glibc']):.1f} s -> {ratio['monai_overlap_glibc']:.3f}x",
        flush=True,
    )
    return {"tissue_fraction": fraction, "tissue_tiles": tissue_tiles, "rounds": runs} | {
        f"ratio_{k}": v for k, v in ratio.items()
    }


def part_null(slide: Path, work: Path) -> dict:
    splitter = TissueTileSplitter(patch_size=4096, overlap=512, level=0, progress=False)
    outcome = segment_slide(
        str(slide), work / "null", NullNet(), WholeSlideInferer(splitter, batch_size=1), progress=False
    )
    plan = splitter.plan(str(slide))
    cells = sum((b[1] - b[0]) * (b[3] - b[2]) for b in (plan.grid.cell_box(i, j) for i, j in plan.cells))
    tile_px = outcome.tissue_tiles * plan.tile_size[0] * plan.tile_size[1]
    cores = os.cpu_count() or 1
    rate = cells / 1e6 / outcome.seconds / cores
    print(
        f"null: {outcome.tissue_tiles} tiles of 4096 px (overlap 512) at level 0, {cells / 1e6:.0f} Mpx of cells "
        f"({tile_px / 1e6:.0f} Mpx read): {outcome.seconds:.1f} s -> {rate:.2f} Mpx/s per core on {cores} cores (goal >= 3)\n"
        f"null:   stages {json.dumps(outcome.timings)}",
        flush=True,
    )
    return {
        "tiles": outcome.tissue_tiles,
        "cell_mpx": cells / 1e6,
        "seconds": outcome.seconds,
        "mpx_s_per_core": rate,
        "stages": outcome.timings,
    }


def memory_worker(slide: str, checkpoint: str | None, out: str, level: int | None) -> None:
    tile, trained_level = trained_input(checkpoint, slide)
    level = trained_level if level is None else level
    start = time.perf_counter()
    outcome, _ = ours(Path(slide), network(checkpoint), tile, level, OVERLAP_PX, Path(out))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {"tiles": outcome.tissue_tiles, "seconds": time.perf_counter() - start, "peak_mb": peak_mb}
        )
    )


def monai_worker(slide: str, checkpoint: str | None, overlap: int) -> None:
    tile, level = trained_input(checkpoint, slide)
    seconds, tiles = monai_native(Path(slide), network(checkpoint), tile, level, overlap)
    print(json.dumps({"seconds": seconds, "tiles": tiles}))


def part_memory(small: Path, big: Path, checkpoint: str | None, out: Path, level: int | None) -> dict:
    results = {}
    for name, slide in (("20k", small), ("80k", big)):
        command = [sys.executable, __file__, "--memory-worker", str(slide), "--out", str(out)]
        command += ["--checkpoint", checkpoint] if checkpoint else []
        command += ["--memory-level", str(level)] if level is not None else []
        run = subprocess.run(command, capture_output=True, text=True, check=True)
        results[name] = r = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            f"memory: {name} slide, {r['tiles']} tissue tiles, {r['seconds']:.0f} s, peak RSS {r['peak_mb']:.0f} MB",
            flush=True,
        )
    ratio = results["80k"]["peak_mb"] / results["20k"]["peak_mb"]
    print(f"memory: peak RSS ratio 80k / 20k = {ratio:.3f} (goal <= 1.2)", flush=True)
    return results | {"ratio": ratio}


def part_tissue(full: Path, quarter: Path, checkpoint: str | None, out: Path) -> dict:
    tile, level = trained_input(checkpoint, full)
    net = network(checkpoint)
    times, tiles = {}, {}
    for name, slide in (("full", full), ("quarter", quarter)):
        outcome, _ = ours(slide, net, tile, level, OVERLAP_PX, out / name)
        times[name], tiles[name] = outcome.seconds, outcome.tissue_tiles
        print(f"tissue: {name:8s} {tiles[name]:5d} tissue tiles, {times[name]:.1f} s", flush=True)
    print(
        f"tissue: tile ratio {tiles['full'] / tiles['quarter']:.2f}x, time ratio {times['full'] / times['quarter']:.2f}x, "
        "slide-area ratio 1.00x",
        flush=True,
    )
    return {"tiles": tiles, "seconds": times}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="a trained tiny model.pt (the demo's); default: random weights")
    parser.add_argument("--parts", nargs="+", default=["speed", "commands", "null", "tissue", "memory"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of (a), medians reported")
    parser.add_argument("--work", help="keep (and reuse) the slides here (default: a temporary folder)")
    parser.add_argument("--memory-level", type=int, help="(c): read both slides at this level")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--monai-worker", help=argparse.SUPPRESS)
    parser.add_argument("--overlap", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        return memory_worker(args.memory_worker, args.checkpoint, args.out, args.memory_level)
    if args.monai_worker:
        return monai_worker(args.monai_worker, args.checkpoint, args.overlap)
    print(
        f"machine: {platform.platform()}, {platform.processor() or 'cpu'}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; tiny net ({args.checkpoint or 'random weights'}); load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        slides = work / "slides"
        base = next(iter(slides.glob(f"synth_{SEED}_wsi.tiff")), None)
        if base is None:
            (made,) = write_synthetic_slides(
                slides, count=1, width=16384, height=12288, seed=SEED, progress=False
            )
            base = made.wsi_path
        with open_slide(base) as src:
            h, w = src.level_shapes[0]
        if "speed" in args.parts:
            results["speed"] = part_speed(Path(base), args.checkpoint, work, args.rounds)
        if "commands" in args.parts:
            # the same slide with its right half turned to glass: 41 % tissue, as a kidney section
            # on its slide (and the 80k GPU slide) has, where the whole one has 85 %
            lean = slides / "half_wsi.tiff"
            if not lean.exists():
                derived_slide(Path(base), lean, keep_box=(0, 0, h, w // 2))
            results["commands"] = {
                name: part_commands(name, path, args.checkpoint, work, args.rounds)
                for name, path in (("whole slide", Path(base)), ("left half only", lean))
            }
        if "null" in args.parts:
            results["null"] = part_null(Path(base), work)
        if "tissue" in args.parts:
            quarter = slides / "quarter_wsi.tiff"
            if not quarter.exists():
                derived_slide(Path(base), quarter, keep_box=(0, 0, h // 2, w // 2))
            results["tissue"] = part_tissue(Path(base), quarter, args.checkpoint, work)
        if "memory" in args.parts:
            small = next(iter(slides.glob("synth_51_wsi.tiff")), None)
            if small is None:
                (made,) = write_synthetic_slides(
                    slides, count=1, width=20480, height=20480, seed=51, progress=False
                )
                small = made.wsi_path
            big = slides / "big_wsi.tiff"
            if not big.exists():
                derived_slide(Path(small), big, side=81920)
            results["memory"] = part_memory(
                Path(small), big, args.checkpoint, work / "memory", args.memory_level
            )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
