"""Stitching choices side by side: no overlap, centre crop and blending, judged by objects as well as pixels.

One run, the same trained model (the demo's tiny net) on held-out synthetic slides with exact truth:
  the demo's `synth_900` (8192 x 6144) and a 16,384 x 12,288 slide at a seed nobody trained on.
Per slide and per choice (tile overlap in pixels at the inference level, crop or blend):
  WSI Dice; object F1 (8-connected objects of both masks at 1/4 scale, IoU >= 0.5, one to one,
  components under evaluate's 200 um^2 not counted, as `evaluate` counts them);
  GeoJSON count against the true count; fragments (GeoJSON features under min_object_um2);
  invalid polygons; the project's KPIs F1; and the time, as a ratio to no overlap.

    python benchmarks/stitching.py --checkpoint runs/demo/model.pt [--slides DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import shapely.geometry
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `custom` lives in the repository root

from wsi_inference import trained_input  # noqa: E402

from custom.checkpoints import config_from_checkpoint, load_weights  # noqa: E402
from custom.inference.inferer import WholeSlideInferer  # noqa: E402
from custom.inference.segment import output_paths, segment_slide  # noqa: E402
from custom.inference.splitter import TissueTileSplitter  # noqa: E402
from custom.metrics.evaluate import INSTANCE_MIN_UM2  # noqa: E402
from custom.metrics.instances import instance_scores  # noqa: E402
from custom.metrics.kpis import kpis_task2, remove_small_components  # noqa: E402
from custom.metrics.wsi import wsi_dice  # noqa: E402
from custom.networks import build_network  # noqa: E402
from custom.synth import write_synthetic_slides  # noqa: E402
from custom.wsi.reader import open_mask  # noqa: E402

CHOICES = [  # (name, tile as a multiple of the training patch, overlap px at the inference level, blend)
    ("no overlap", 1, 0, "crop"),
    ("crop 32", 1, 32, "crop"),
    ("crop 64", 1, 64, "crop"),
    ("gaussian 64", 1, 64, "gaussian"),
    ("crop 128", 1, 128, "crop"),
    ("gaussian 128", 1, 128, "gaussian"),
    # stride 256 = the tokenizer's window: every tile tokenizes a pixel inside the same window
    ("crop 256", 1, 256, "crop"),
    ("2x tile, crop 256", 2, 256, "crop"),
]
OBJECT_SCALE = 4  # objects compared at 1/4 of level 0
BLOCK_PX = 4096


def sampled(mask_path: Path, step: int = OBJECT_SCALE) -> np.ndarray:
    """A mask read block by block at level 0 and kept every `step` pixels (> 0 is foreground)."""
    mask = open_mask(mask_path)
    h, w = mask.level_shapes[0]
    out = np.zeros((-(-h // step), -(-w // step)), bool)
    for y in range(0, h, BLOCK_PX):
        for x in range(0, w, BLOCK_PX):
            block = mask.read_region((y, x), (min(BLOCK_PX, h - y), min(BLOCK_PX, w - x)), level=0)
            out[
                y // step : (y + block.shape[0] + step - 1) // step,
                x // step : (x + block.shape[1] + step - 1) // step,
            ] = block[::step, ::step] > 0
    mask.close()
    return out


def score(pred: Path, truth: Path, geojson: Path, min_um2: float) -> dict:
    features = json.loads(geojson.read_text())["features"]
    areas = [f["properties"]["area_um2"] or 0.0 for f in features]
    invalid = sum(
        not shapely.geometry.Polygon(
            f["geometry"]["coordinates"][0], f["geometry"]["coordinates"][1:]
        ).is_valid
        for f in features
    )
    with open_mask(pred) as p, open_mask(truth) as g:
        kpis = kpis_task2(p, g)
        mpp = g.mpp[1]
    # as `evaluate` counts objects: components under INSTANCE_MIN_UM2 at the sampled scale are not objects
    min_px = math.ceil(INSTANCE_MIN_UM2 / (OBJECT_SCALE * mpp) ** 2)
    objects = instance_scores(*(remove_small_components(sampled(m), min_px) for m in (pred, truth)))
    return {
        "wsi_dice": wsi_dice(pred, truth),
        "object_f1": objects.f1,
        "count": len(features),
        "true_count": objects.n_gt,
        "fragments": sum(a < min_um2 for a in areas),
        "invalid": invalid,
        "kpis_f1": kpis.f1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="the demo's model.pt (tiny net, 512 px at level 1)"
    )
    parser.add_argument(
        "--slides", help="folder with synth_900_wsi.tiff (default: runs/demo/slides/held_out)"
    )
    parser.add_argument("--out", help="keep the predictions here (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=4242, help="seed of the 16k x 12k held-out slide")
    args = parser.parse_args()
    torch.manual_seed(0)
    net = load_weights(
        build_network(config_from_checkpoint(args.checkpoint), load_tokenizer_checkpoint=False),
        args.checkpoint,
    ).eval()
    held_out = Path(args.slides or REPO / "runs" / "demo" / "slides" / "held_out")
    tile, level = trained_input(args.checkpoint, held_out / "synth_900_wsi.tiff")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.checkpoint}: {tile}-px tiles at level {level}; load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        big_dir = work / "slides"
        (big,) = [p for p in big_dir.glob(f"synth_{args.seed}_wsi.tiff")] or [
            r.wsi_path
            for r in write_synthetic_slides(big_dir, 1, 16384, 12288, seed=args.seed, progress=False)
        ]
        slides = [held_out / "synth_900_wsi.tiff", Path(big)]
        rows = []
        for slide in slides:
            truth = slide.with_name(slide.name.replace("_wsi", "_mask"))
            base = None
            for name, scale, overlap, blend in CHOICES:
                splitter = TissueTileSplitter(
                    patch_size=tile * scale, overlap=overlap, level=level, progress=False
                )
                inferer = WholeSlideInferer(splitter, batch_size=4, blend=blend)
                out = work / "pred" / name.replace(" ", "_")
                start = time.perf_counter()
                outcome = segment_slide(str(slide), out, net, inferer, progress=False)
                seconds = time.perf_counter() - start
                base = base or seconds
                paths = output_paths(out, slide)
                row = {
                    "slide": slide.name,
                    "choice": name,
                    "tiles": outcome.tissue_tiles,
                    "seconds": seconds,
                    "time_ratio": seconds / base,
                }
                row |= score(paths["pred"], truth, paths["geojson"], inferer.min_object_um2)
                rows.append(row)
                print(
                    f"{slide.name:20s} {name:13s} tiles {row['tiles']:4d}  WSI Dice {row['wsi_dice']:.4f}  object F1 {row['object_f1']:.3f}  "
                    f"count {row['count']:3d}/{row['true_count']:3d}  fragments {row['fragments']}  invalid {row['invalid']}  "
                    f"KPIs F1 {row['kpis_f1']:.3f}  {seconds:6.1f} s ({row['time_ratio']:.2f}x)",
                    flush=True,
                )
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
