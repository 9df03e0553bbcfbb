"""What only a GPU can measure, in one prepared run: the full-size net and a gigapixel slide.

  network     4096 x 4096 patches per second of the full-size HoloHisto net (random weights, batch 1,
              inference mode, bfloat16 autocast) and of its speed variants, each beside the same net in
              float32 (largest logit difference, argmax agreement) and with its peak GPU memory:
              float32_norm (GroupNorm promoted to float32 by autocast, as before the bf16 norm),
              default (GroupNorm/SiLU in bf16), channels_last, compile (torch.compile of the tokenizer's
              encoder), fast (the fast preset: first downsampling folded into conv_in), fast_channels_last;
              plus batch 2 of the default
  train       one training step (forward, DiceCE + quantizer loss, backward, AdamW) on a 4096 x 4096
              patch under bfloat16 autocast: tokenizer trainable / frozen x set_grad_checkpointing
              off / on, and trainable + checkpointing with float32 GroupNorm. Peak memory of the first
              step (cudnn.benchmark tries algorithms then) and of the steps after it, s per step
  tokenizer   the full and fast tokenizers alone: 4K patches tokenized per second, float32 and bfloat16
  wsi         an 80,000 x 70,000 synthetic slide (a synthetic slide tiled periodically) segmented
              end to end with the full net, as inference.json runs it: cuCIM reads tissue tiles at
              level 0, bf16 network, stitching, cleanup, pyramidal mask, GeoJSON and overlay.
              The weights are random, so the mask means nothing; the time is what counts. The net's
              own share (timed with a synchronise after each batch) is reported beside the wall time.

Each part writes its figures to `<out>/gpu.json` as soon as it ends, so a run cut short keeps them.
With one lent H200 and 15 minutes in all, run the parts network, train and tokenizer first (about 4
minutes of device time after the machine starts), then wsi in what is left.

    python benchmarks/gpu.py --out DIR --parts network train tokenizer   # on the GPU machine
    python benchmarks/gpu.py --out DIR --smoke     # the same code paths, tiny sizes, on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
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
from custom.networks import holohisto_fast, holohisto_full, holohisto_tiny  # noqa: E402
from custom.networks.blocks import GroupNorm  # noqa: E402
from custom.networks.presets import fast_tokenizer, full_tokenizer, tiny_tokenizer  # noqa: E402
from custom.outputs.pyramid import pyramid_shapes, write_pyramid  # noqa: E402
from custom.synth import write_synthetic_slides  # noqa: E402
from custom.training import SegmentationLoss, aux_loss_of  # noqa: E402
from custom.wsi.reader import open_slide  # noqa: E402

GIB = 2**30


class Sizes:
    def __init__(self, smoke: bool):
        self.device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
        self.smoke = smoke
        self.net = holohisto_tiny if smoke else holohisto_full
        self.fast = holohisto_tiny if smoke else holohisto_fast
        self.tokenizers = (
            {"tiny": tiny_tokenizer()} if smoke else {"full": full_tokenizer(), "fast": fast_tokenizer()}
        )
        self.patch = 256 if smoke else 4096  # bf16 autocast on a CPU without bf16 units is slow
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


NETWORK_VARIANTS = ("float32_norm", "default", "channels_last", "compile", "fast", "fast_channels_last")


@contextlib.contextmanager
def float32_group_norm():
    """GroupNorm as torch runs it under autocast (promoted to float32): the tokenizer before its bf16 norm."""
    low_precision = GroupNorm.forward
    GroupNorm.forward = nn.GroupNorm.forward
    try:
        yield
    finally:
        GroupNorm.forward = low_precision


def variant_net(s: Sizes, variant: str) -> nn.Module:
    torch.manual_seed(0)
    net = (s.fast if variant.startswith("fast") else s.net)().to(s.device).eval()
    if variant.endswith("channels_last"):
        net = net.to(memory_format=torch.channels_last)
    if variant == "compile":
        # The encoder always sees window batches of one shape: one graph, compiled once.
        net.tokenizer.encoder = torch.compile(net.tokenizer.encoder)
    return net


def part_network(s: Sizes, variants: tuple[str, ...] = NETWORK_VARIANTS) -> dict:
    torch.manual_seed(0)
    x = torch.rand(1, 3, s.patch, s.patch, device=s.device)
    out: dict = {}
    references: dict[str, torch.Tensor] = {}  # float32 logits of each preset (same seed, same weights)
    for variant in variants:
        preset = "fast" if variant.startswith("fast") else "full"
        start = time.perf_counter()
        try:
            net = variant_net(s, variant)
            if preset not in references:
                with torch.inference_mode():
                    references[preset] = net(x).float()
            inputs = x.contiguous(memory_format=torch.channels_last) if "channels_last" in variant else x
            norm = float32_group_norm() if variant == "float32_norm" else contextlib.nullcontext()

            def forward(net=net, inputs=inputs):
                with torch.inference_mode(), torch.autocast(s.device, dtype=torch.bfloat16):
                    return net(inputs)

            with norm:
                reset_peak(s.device)
                sec = timed(forward, s.runs, s.device)
                logits = forward().float()
            reference = references[preset]
            out[variant] = {
                "seconds_per_patch": sec,
                "patches_per_s": 1 / sec,
                "peak_gib": peak_gib(s.device),
                "max_abs_diff_vs_float32": float((logits - reference).abs().max()),
                "reference_abs_max": float(reference.abs().max()),
                "argmax_agreement": float((logits.argmax(1) == reference.argmax(1)).float().mean()),
                "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
                "variant_s": time.perf_counter() - start,
            }
            del net, logits
        except Exception as err:  # one variant failing (compile, memory) must not lose the others
            traceback.print_exc()
            out[variant] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(variant, json.dumps(out[variant]), flush=True)
    torch.manual_seed(0)
    net = s.net().to(s.device).eval()
    x2 = torch.rand(2, 3, s.patch, s.patch, device=s.device)

    def forward2():
        with torch.inference_mode(), torch.autocast(s.device, dtype=torch.bfloat16):
            return net(x2)

    reset_peak(s.device)
    sec = timed(forward2, s.runs, s.device)
    out["default_batch2"] = {
        "seconds_per_batch": sec,
        "patches_per_s": 2 / sec,
        "peak_gib": peak_gib(s.device),
    }
    return out


TRAIN_CONFIGS = (
    ("trainable_tokenizer", False, False, False),
    ("trainable_tokenizer_checkpointed", False, True, False),
    ("frozen_tokenizer", True, False, False),
    ("frozen_tokenizer_checkpointed", True, True, False),
    ("trainable_tokenizer_checkpointed_float32_norm", False, True, True),
)


def part_train(s: Sizes) -> dict:
    out = {}
    for name, frozen, checkpointed, float32_norm in TRAIN_CONFIGS:
        torch.manual_seed(0)
        net = s.net(freeze_tokenizer=frozen).to(s.device).train()
        net.set_grad_checkpointing(checkpointed)
        loss_fn = SegmentationLoss(aux_loss_of(net))
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
        x = torch.rand(1, 3, s.patch, s.patch, device=s.device)
        y = (torch.rand(1, 1, s.patch, s.patch, device=s.device) > 0.8).long()

        def step(net=net, loss_fn=loss_fn, opt=opt, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(s.device, dtype=torch.bfloat16):
                loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()

        norm = float32_group_norm() if float32_norm else contextlib.nullcontext()
        try:
            with norm:
                reset_peak(s.device)
                step()
                sync(s.device)
                first = peak_gib(s.device)
                reset_peak(s.device)
                sec = timed(step, max(2, s.runs // 2), s.device)
            out[name] = {
                "seconds_per_step": sec,
                "peak_gib": peak_gib(s.device),
                "first_step_peak_gib": first,
            }
        except torch.OutOfMemoryError as err:
            out[name] = {
                "error": f"out of memory: {str(err).splitlines()[0]}",
                "peak_gib": peak_gib(s.device),
            }
        print(name, json.dumps(out[name]), flush=True)
        del net, opt, x, y, loss_fn
        reset_peak(s.device)
    return out


def part_tokenizer(s: Sizes) -> dict:
    out = {}
    for name, config in s.tokenizers.items():
        out[f"{name}_float32"] = tokenizer_measure(config, s.device, s.runs // 2, 64)
        if not s.smoke:  # bf16 on a CPU without bf16 units: minutes for a 4K patch, nothing learnt
            out[f"{name}_bfloat16"] = tokenizer_measure(config, s.device, s.runs // 2, 64, torch.bfloat16)
    return out


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
