"""Is the random 4K sampler ever the bottleneck? Sampler patches/s (cuCIM vs OpenSlide) against training steps/s.

Measured side by side in one run on the same synthetic slides:
  1. the random tissue sampler over 2 DataLoader workers, 4096 x 4096 patches at level 0 with
     their labels, once with cuCIM and once with OpenSlide forced as the slide backend;
  2. the tiny configuration's training step (forward + backward + AdamW) on one 4096 x 4096 patch,
     and on the demo's batch of 4 x 512 x 512 at level 1, with the sampler feeding that batch too.

    python benchmarks/sampler_throughput.py [--slides DIR] [--patches 24]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `custom` lives in the repository root

from custom.data.datalists import discover_kpis_slides  # noqa: E402
from custom.data.patches import RandomTissuePatchDataset  # noqa: E402
from custom.networks import holohisto_tiny  # noqa: E402
from custom.synth import write_synthetic_slides  # noqa: E402
from custom.training import SegmentationLoss, aux_loss_of  # noqa: E402

WORKERS = 2


def sampler_rate(items, backend, patch_px, level, batch, patches) -> float:
    """Patches per second delivered by the DataLoader, after one warm-up batch."""
    ds = RandomTissuePatchDataset(
        items,
        patch_size=patch_px,
        patch_level=level,
        samples_per_epoch=patches + batch,
        seed=0,
        backend=backend,
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=WORKERS)
    it = iter(loader)
    next(it)  # workers started, slides opened, tissue found
    start = time.perf_counter()
    n = sum(b["image"].shape[0] for b in it)
    return n / (time.perf_counter() - start)


def train_step_rate(patch_px, batch, steps) -> float:
    net = holohisto_tiny()
    loss_fn = SegmentationLoss(aux_loss_of(net))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    x = torch.rand(batch, 3, patch_px, patch_px)
    y = (torch.rand(batch, 1, patch_px, patch_px) > 0.9).float()

    def step():
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()

    step()  # warm-up (k-means codebook init happens on the first batch)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--slides", type=Path, help="a folder of <id>_wsi.tiff + <id>_mask.tiff (default: synthesise 2)"
    )
    parser.add_argument("--patches", type=int, default=24, help="4K patches timed per backend")
    args = parser.parse_args()
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {WORKERS} workers"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.slides
        if folder is None:
            folder = Path(tmp)
            list(write_synthetic_slides(folder, count=2, width=16384, height=12288, seed=40, progress=False))
        items = discover_kpis_slides(folder)
        print(f"slides: {len(items)} in {folder}")
        rates = {b: sampler_rate(items, b, 4096, 0, 1, args.patches) for b in ("cucim", "openslide")}
        for backend, rate in rates.items():
            print(f"sampler 4096 px, level 0, with labels, {backend:9s}: {rate:6.2f} patches/s")
        print(f"cuCIM / OpenSlide: {rates['cucim'] / rates['openslide']:.2f}x")
        step_4k = train_step_rate(4096, 1, 2)
        print(f"tiny net training, 1 x 4096 px:          {step_4k:6.3f} steps/s = {step_4k:6.3f} patches/s")
        demo_sampler = sampler_rate(items, "auto", 512, 1, 4, 64)
        step_demo = train_step_rate(512, 4, 8)
        print(
            f"demo setting (4 x 512 px at level 1): sampler {demo_sampler:6.1f} patches/s, training {4 * step_demo:6.1f} patches/s"
        )
        for name, feed, need in (("4K", rates["cucim"], step_4k), ("demo", demo_sampler, 4 * step_demo)):
            verdict = (
                "sampler is faster: never the bottleneck" if feed > need else "SAMPLER IS THE BOTTLENECK"
            )
            print(f"{name}: sampler / training = {feed / need:.1f}x -> {verdict}")


if __name__ == "__main__":
    main()
