"""Tokenizer throughput: 4096 x 4096 patches tokenized per second (tokens + code indices, no skips).

    .venv/bin/python benchmarks/tokenizer_throughput.py [--runs 3] [--threads N] [--window-batch 16]

Always: the tiny tokenizer (configs/tiny.json's) on the CPU. When a CUDA GPU is present, also the
full tokenizer (the taming f16/1024 shape) on the GPU, in float32 and under bfloat16 autocast.
Each configuration: build the tokenizer (eval, seeded random weights and a k-means-free codebook;
throughput does not depend on the values), one 4K patch of random [-1, 1] pixels, one warm-up pass,
then --runs timed passes under torch.inference_mode; reported: the median seconds per patch,
patches per second and 256-px windows per second. The machine is printed first: a number without
its machine is not a result.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `custom` lives in the repository root

from custom.networks.config import TokenizerConfig  # noqa: E402
from custom.networks.presets import full_tokenizer, tiny_tokenizer  # noqa: E402
from custom.networks.tokenizer import VQTokenizer  # noqa: E402

PATCH_SIDE_PX = 4096


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    parts = [
        f"CPU {cpu}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads",
        f"torch {torch.__version__}",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    with contextlib.suppress(OSError):
        parts.append(f"load average {os.getloadavg()[0]:.1f} (1 min)")
    return "; ".join(parts)


def measure(config: TokenizerConfig, device: str, runs: int, window_batch: int, autocast_dtype=None) -> dict:
    torch.manual_seed(0)
    tokenizer = (
        VQTokenizer(config.updated({"kmeans_init": False, "window_batch": window_batch})).to(device).eval()
    )
    patch = torch.rand(1, 3, PATCH_SIDE_PX, PATCH_SIDE_PX, device=device) * 2 - 1
    windows = (PATCH_SIDE_PX // tokenizer.window_px) ** 2
    seconds = []
    with (
        torch.inference_mode(),
        torch.autocast(device, dtype=autocast_dtype, enabled=autocast_dtype is not None),
    ):
        for i in range(runs + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = tokenizer(patch)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first pass warms up allocators and kernels
                seconds.append(time.perf_counter() - start)
    assert out.indices.shape == (
        1,
        PATCH_SIDE_PX // tokenizer.token_stride,
        PATCH_SIDE_PX // tokenizer.token_stride,
    )
    median = statistics.median(seconds)
    return {
        "seconds_per_patch": median,
        "patches_per_s": 1.0 / median,
        "windows_per_s": windows / median,
        "params_m": sum(p.numel() for p in tokenizer.parameters()) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="timed passes per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--window-batch", type=int, default=16, help="256-px windows encoded at a time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine()}")
    rows = [("tiny", "cpu", "float32", measure(tiny_tokenizer(), "cpu", args.runs, args.window_batch))]
    if torch.cuda.is_available():
        rows.append(
            ("full", "cuda", "float32", measure(full_tokenizer(), "cuda", args.runs, args.window_batch))
        )
        rows.append(
            (
                "full",
                "cuda",
                "bf16 autocast",
                measure(full_tokenizer(), "cuda", args.runs, args.window_batch, torch.bfloat16),
            )
        )
    else:
        print(
            "no CUDA GPU: the full tokenizer is measured only on a GPU (its encoder does ~260x the tiny one's "
            "FLOPs: 35 vs 0.14 TFLOP per 4K patch, a quarter of an hour per patch on this kind of CPU)"
        )
    print(
        f"\n{PATCH_SIDE_PX} x {PATCH_SIDE_PX} px patches, batch 1, median of {args.runs} passes after a warm-up pass"
    )
    print(
        "| tokenizer | params (M) | device | precision | s / 4K patch | 4K patches / s | 256-px windows / s |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, device, precision, r in rows:
        print(
            f"| {name} | {r['params_m']:.2f} | {device} | {precision} | {r['seconds_per_patch']:.3f} "
            f"| {r['patches_per_s']:.3f} | {r['windows_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
