"""Issue 15: does a 2048-px net judge decoys better when its context maps are not clipped to its tile?

The orientation branch (custom/networks/orientation_context.py) computes its fields over the patch
it is given, so a token near a tile's edge reads a field clipped there. This runs `segment` with the
branch's maps computed once over the whole inference level and cropped to each tile instead, so every
token reads the same field wherever the tile falls. Everything else (tiles, network, stitching,
outputs) is the pipeline's own. Score the output with `python -m custom evaluate` and
benchmarks/dice_budget.py, beside a plain `segment` of the same checkpoint.

    python benchmarks/context_slide_maps.py --checkpoint RUN/model.pt --slides DIR --out PRED_DIR

The level is read whole, so this is for the small decoy slides (3072 x 2048 px at 1 um/px), not
for real slides.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from custom.inference import splitter as tiles
from custom.networks import orientation_context as branch


@contextlib.contextmanager
def slide_wide_maps():
    """Patch the splitter to note each tile's origin, and the branch to crop slide-wide maps there."""
    origins: collections.deque = collections.deque()
    state: dict = {}
    read_tiles, tile_maps = tiles.TissueTileSplitter.__call__, branch.OrientationContext.forward

    def read(self, inputs):
        plan = inputs if isinstance(inputs, tiles.TilePlan) else self.plan(inputs)
        state.clear()
        state["plan"] = plan
        for patch, origin in read_tiles(self, plan):
            origins.append(origin)  # the network takes tiles in the order they are yielded
            yield patch, origin

    def maps(self, x):
        if "maps" not in state:
            plan = state["plan"]
            level = torch.from_numpy(np.ascontiguousarray(plan.slide.read_level(plan.level)[..., :3]))
            level = level.permute(2, 0, 1)[None].float() / 255 * 2 - 1
            pad_h, pad_w = -level.shape[-2] % self.cell_px, -level.shape[-1] % self.cell_px
            state["maps"] = tile_maps(self, F.pad(level, (0, pad_w, 0, pad_h), value=1.0))  # white glass
        cell, (rows, cols) = self.cell_px, (x.shape[-2] // self.cell_px, x.shape[-1] // self.cell_px)
        crops = []
        for _ in range(x.shape[0]):
            y0, x0 = (v // cell for v in origins.popleft())
            crop = state["maps"][..., y0 : y0 + rows, x0 : x0 + cols]
            pad = (0, cols - crop.shape[-1], 0, rows - crop.shape[-2])  # a level shorter than a tile
            crops.append(F.pad(crop, pad, mode="replicate") if any(pad) else crop)
        return torch.cat(crops).to(x.dtype)

    tiles.TissueTileSplitter.__call__, branch.OrientationContext.forward = read, maps
    try:
        yield
    finally:
        tiles.TissueTileSplitter.__call__, branch.OrientationContext.forward = read_tiles, tile_maps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a model.pt trained with context_orientation.json"
    )
    parser.add_argument("--slides", required=True, help="a folder of slides")
    parser.add_argument("--out", required=True, help="where segment writes its outputs")
    args = parser.parse_args(argv)
    from custom import cli

    with slide_wide_maps():
        cli.segment(args.slides, args.out, checkpoint=args.checkpoint, overwrite=True)


if __name__ == "__main__":
    main()
