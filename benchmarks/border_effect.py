"""How far inside a tile the network's labels stop depending on the tile border: the margin overlap must give.

For probe points on glomeruli of a held-out slide, a 16-row band is predicted once at the centre of a
tile and again with the tile's top border `d` pixels above the band. The share of the band's
foreground (union of both predictions) that differs is printed per `d`; where it stops falling,
the border no longer matters, and the rest is the floor set by the context itself changing.

    python benchmarks/border_effect.py --checkpoint runs/demo/model.pt --slide SLIDE_wsi.tiff [--probes 12]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `custom` lives in the repository root

from wsi_inference import trained_input  # noqa: E402

from custom.checkpoints import config_from_checkpoint, load_weights  # noqa: E402
from custom.networks import build_network  # noqa: E402
from custom.wsi.reader import open_mask, open_slide  # noqa: E402

BAND_PX = 16
DISTANCES_PX = (0, 8, 16, 32, 48, 64, 96, 128, 192)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument(
        "--slide", required=True, help="a held-out <id>_wsi.tiff with its <id>_mask.tiff beside it"
    )
    parser.add_argument("--probes", type=int, default=12)
    args = parser.parse_args()
    net = load_weights(
        build_network(config_from_checkpoint(args.checkpoint), load_tokenizer_checkpoint=False),
        args.checkpoint,
    ).eval()
    tile, level = trained_input(args.checkpoint, args.slide)
    slide = open_slide(args.slide)
    mask = open_mask(args.slide.replace("_wsi", "_mask"))
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}; {args.checkpoint}: "
        f"{tile}-px tiles at level {level}; {args.probes} probes on {Path(args.slide).name}; load average {os.getloadavg()[0]:.1f}"
    )
    scale = round(slide.downsamples[level])
    ys, xs = np.nonzero(mask.read_level(len(mask.level_shapes) - 1) > 0)
    coarse = round(mask.downsamples[-1] / slide.downsamples[level])
    pick = np.random.default_rng(0).choice(len(ys), args.probes, replace=False)

    def predict(y: int, x: int) -> np.ndarray:
        rgb = slide.read_region((y * scale, x * scale), (tile, tile), level=level).transpose(2, 0, 1)
        with torch.inference_mode():
            out = net(torch.from_numpy(rgb.copy())[None].float() / 255)
        return (out[0, 1] > out[0, 0]).numpy()

    differ = {d: [0, 0] for d in DISTANCES_PX}
    for k in pick:
        y, x = int(ys[k]) * coarse, int(xs[k]) * coarse - tile // 2
        centre = predict(y - tile // 2, x)[tile // 2 : tile // 2 + BAND_PX]
        for d in DISTANCES_PX:
            band = predict(y - d, x)[d : d + BAND_PX]
            differ[d][0] += int((band != centre).sum())
            differ[d][1] += max(int((band | centre).sum()), 1)
    for d in DISTANCES_PX:
        print(
            f"{d:4d} px from the tile border: {differ[d][0] / differ[d][1]:.3f} of the band's foreground differs from the centre's"
        )


if __name__ == "__main__":
    main()
