"""What only a GPU can measure, in one prepared run: the full-size net and a gigapixel slide.

  network     the full-size HoloHisto net (random weights): 4096 x 4096 patches per second under
              bfloat16 autocast, batch 1 and 2, and the peak GPU memory of each
  train       one training step (forward, DiceCE + quantizer loss, backward, AdamW) on a 4096 x 4096
              patch under bfloat16 autocast, tokenizer trainable (train.json's default) and frozen
  tokenizer   the full tokenizer alone: 4K patches tokenized per second, float32 and bfloat16
  wsi         an 80,000 x 70,000 synthetic slide (a synthetic slide tiled periodically) segmented
              end to end with the full net, as inference.json runs it: cuCIM reads tissue tiles at
              level 0, bf16 network, stitching, cleanup, pyramidal mask, GeoJSON and overlay.
              The weights are random, so the mask means nothing; the time is what counts. The net's
              own share (timed with a synchronise after each batch) is reported beside the wall time.

Each part writes its figures to `<out>/gpu.json` as soon as it ends, so a run cut short keeps them.

    python benchmarks/gpu.py --out DIR             # on the GPU machine
    python benchmarks/gpu.py --out DIR --smoke     # the same code paths, tiny sizes, on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `custom` lives in the repository root
sys.path.insert(0, str(REPO / "benchmarks"))

from tokenizer_throughput import machine  # noqa: E402
from tokenizer_throughput import measure as tokenizer_measure  # noqa: E402
from wsi_inference import wrapped_read  # noqa: E402

from custom.inference.inferer import WholeSlideInferer  # noqa: E402
from custom.inference.segment import segment_slide  # noqa: E402
from custom.inference.splitter import TissueTileSplitter  # noqa: E402
from custom.networks import holohisto_full, holohisto_tiny  # noqa: E402
from custom.networks.holohisto import FULL_TOKENIZER, TINY_TOKENIZER  # noqa: E402
from custom.outputs.pyramid import pyramid_shapes, write_pyramid  # noqa: E402
from custom.synth import write_synthetic_slides  # noqa: E402
from custom.training import SegmentationLoss  # noqa: E402
from custom.wsi.reader import open_slide  # noqa: E402

GIB = 2**30


class Sizes:
    def __init__(self, smoke: bool):
        self.device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
        self.net = holohisto_tiny if smoke else holohisto_full
        self.tokenizer = TINY_TOKENIZER if smoke else FULL_TOKENIZER
        self.patch = 512 if smoke else 4096
        self.runs = 2 if smoke else 8
        self.source = (2048, 2048) if smoke else (8192, 8192)
        self.slide = (6000, 5000) if smoke else (70_000, 80_000)  # (height, width)
        self.tile_level0 = 512 if smoke else 4096


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / GIB if device == "cuda" else None


def timed(fn, runs: int, device: str) -> float:
    """Median seconds of `runs` calls after one warm-up call."""
    seconds = []
    for i in range(runs + 1):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def part_network(s: Sizes) -> dict:
    torch.manual_seed(0)
    net = s.net().to(s.device).eval()
    out = {"params_m": sum(p.numel() for p in net.parameters()) / 1e6}
    for batch in (1, 2):
        x = torch.rand(batch, 3, s.patch, s.patch, device=s.device)
        reset_peak(s.device)

        def forward(x=x):
            with torch.inference_mode(), torch.autocast(s.device, dtype=torch.bfloat16):
                return net(x)

        sec = timed(forward, s.runs, s.device)
        out[f"batch{batch}"] = {
            "seconds_per_batch": sec,
            "patches_per_s": batch / sec,
            "peak_gib": peak_gib(s.device),
        }
        del x
    return out


def part_train(s: Sizes) -> dict:
    out = {}
    for name, frozen in (("trainable_tokenizer", False), ("frozen_tokenizer", True)):
        torch.manual_seed(0)
        net = s.net(freeze_tokenizer=frozen).to(s.device).train()
        loss_fn = SegmentationLoss(net)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        x = torch.rand(1, 3, s.patch, s.patch, device=s.device)
        y = (torch.rand(1, 1, s.patch, s.patch, device=s.device) > 0.8).long()
        reset_peak(s.device)

        def step(net=net, loss_fn=loss_fn, opt=opt, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(s.device, dtype=torch.bfloat16):
                loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()

        try:
            sec = timed(step, max(2, s.runs // 2), s.device)
            out[name] = {"seconds_per_step": sec, "peak_gib": peak_gib(s.device)}
        except torch.OutOfMemoryError as err:
            out[name] = {
                "error": f"out of memory: {str(err).splitlines()[0]}",
                "peak_gib": peak_gib(s.device),
            }
        del net, opt, x, y
        reset_peak(s.device)
    return out


def part_tokenizer(s: Sizes) -> dict:
    return {
        "float32": tokenizer_measure(s.tokenizer, s.device, s.runs // 2, 64),
        "bfloat16": tokenizer_measure(s.tokenizer, s.device, s.runs // 2, 64, torch.bfloat16),
    }


class TimedNet(nn.Module):
    """The net, with the seconds it spends (synchronised) counted."""

    def __init__(self, net: nn.Module, device: str):
        super().__init__()
        self.net, self.device, self.seconds, self.batches = net, device, 0.0, 0

    def forward(self, x):
        start = time.perf_counter()
        y = self.net(x)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        self.batches += 1
        return y


def part_wsi(s: Sizes, work: Path) -> dict:
    start = time.perf_counter()
    (src,) = write_synthetic_slides(
        work, count=1, width=s.source[1], height=s.source[0], seed=80, progress=False
    )
    synth_s = time.perf_counter() - start
    source = open_slide(src.wsi_path)
    height, width = s.slide
    start = time.perf_counter()
    big = write_pyramid(
        work / "wsi80k_wsi.tiff",
        pyramid_shapes(height, width),
        lambda level, y, x, h, w: wrapped_read(source, level, y, x, h, w),
        channels=3,
        mpp=source.mpp[1],
        compression="jpeg",
    )
    write_s = time.perf_counter() - start
    slide = open_slide(big)
    torch.manual_seed(0)
    net = TimedNet(s.net().to(s.device).eval(), s.device)
    splitter = TissueTileSplitter(
        patch_size=s.tile_level0,
        overlap=128,
        level=0,
        progress=False,  # inference.json's default
    )
    inferer = WholeSlideInferer(splitter, batch_size=1, amp=s.device == "cuda")
    reset_peak(s.device)
    outcome = segment_slide(str(big), work / "out", net, inferer, progress=False)
    grid = splitter.plan(str(big)).grid_tiles
    return {
        "slide_hw": [height, width],
        "backend": slide.backend,
        "slide_file_gb": big.stat().st_size / 1e9,
        "source_synth_s": synth_s,
        "pyramid_write_s": write_s,
        "tiles_tissue": outcome.tissue_tiles,
        "tiles_grid": grid,
        "wall_s": outcome.seconds,
        "stages_s": outcome.timings,
        "network_s": net.seconds,
        "ratio_network": outcome.seconds / net.seconds,
        "objects": outcome.objects,
        "peak_gib": peak_gib(s.device),
        "mask_file_mb": Path(outcome.outputs["pred"]).stat().st_size / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=".", help="folder for gpu.json")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes on any device (checks the code paths)"
    )
    parser.add_argument(
        "--parts", nargs="+", default=["network", "train", "tokenizer", "wsi"], help="which parts, in order"
    )
    parser.add_argument("--work", default=None, help="scratch folder for the slides (default: a temp dir)")
    parser.add_argument("--slide", type=int, nargs=2, metavar=("H", "W"), help="slide size for the wsi part")
    args = parser.parse_args()
    s = Sizes(args.smoke)
    if args.slide:
        s.slide = tuple(args.slide)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"machine": machine(), "device": s.device, "smoke": args.smoke}
    print(results["machine"], flush=True)
    if s.device == "cuda":
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for name in args.parts:
            start = time.perf_counter()
            try:
                if name == "wsi":
                    results[name] = part_wsi(s, Path(work))
                else:
                    results[name] = {
                        "network": part_network,
                        "train": part_train,
                        "tokenizer": part_tokenizer,
                    }[name](s)
            except Exception as err:  # one part failing must not lose the others' figures
                traceback.print_exc()
                results[name] = {"error": f"{type(err).__name__}: {err}"}
            results[name]["part_s"] = time.perf_counter() - start
            print(name, json.dumps(results[name], indent=1), flush=True)
            tmp = out / "gpu.json.tmp"
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(out / "gpu.json")


if __name__ == "__main__":
    main()
