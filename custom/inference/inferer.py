"""The whole-slide inferer: MONAI's `PatchInferer` over tissue tiles, stitched and cleaned slide-wide.

Per slide: `TissueTileSplitter` plans the tiles and reads them ahead on its threads; a
`PatchInferer` (built per slide, so nothing is mutated between slides) runs the network in the
calling thread; `CellMerger` hands every output to the `Stitcher`'s thread and workers, which keep
the stitched labels at the inference level as compressed cells and their components in a
slide-wide union-find. After the last tile, objects under `min_object_um2` are removed and holes
under `max_hole_um2` filled by their whole size, across cell borders, touching only the cells
that change. The result stays at the inference level; the writers give it level-0 geometry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.inferers import Inferer, PatchInferer

from custom.inference.chunks import ChunkedMask
from custom.inference.components import SlideComponents, apply_changes, label_cell
from custom.inference.splitter import TilePlan, TissueTileSplitter
from custom.inference.stitcher import CellMerger, Stitcher, default_workers

logger = logging.getLogger(__name__)

MIN_OBJECT_UM2 = 500.0  # ~25 um across: far below the smallest glomerulus (~2,800 um2), far above a speck
MAX_HOLE_UM2 = 500.0


@dataclass
class StitchResult:
    """A slide's stitched, cleaned labels at the inference level, and what is known of its objects."""

    plan: TilePlan
    labels: ChunkedMask
    objects: list  # (box y0, x0, y1, x1; seed y, x) per kept object, inference-level pixels
    probability: ChunkedMask | None = None
    stats: dict = field(default_factory=dict)

    def close(self) -> None:
        for store in (self.labels, self.probability):
            if store is not None:
                store.close()


class WholeSlideInferer(Inferer):
    """Segment one slide: `inferer(path_or_plan, network) -> StitchResult`.

    Args:
        splitter: a `TissueTileSplitter` (tile size, overlap, level or mpp, tissue settings).
        batch_size: tiles per forward pass.
        blend: "crop" (keep each tile's centre cell), "constant" or "gaussian" (average overlaps).
        probability_factor: also keep a 0..255 foreground-probability map this many times coarser
            than the inference level (None: don't); must divide the tile stride.
        min_object_um2, max_hole_um2: after stitching, objects smaller than this become
            background and enclosed holes smaller than this foreground (0 turns either off; needs
            the slide's mpp).
        smooth: 3 x 3 majority smoothing of two-class labels (outlines without one-pixel spurs).
        amp: run the network under bfloat16 autocast.
        work_dir: where the compressed cells spill (an unlinked temporary file per store).
        workers: cell workers (default: cores - 1 while the network runs, every core for the cleanup
            after it).
    """

    def __init__(
        self,
        splitter: TissueTileSplitter,
        batch_size: int = 1,
        blend: str = "crop",
        sigma_scale: float = 0.125,
        probability_factor: int | None = None,
        min_object_um2: float = MIN_OBJECT_UM2,
        max_hole_um2: float = MAX_HOLE_UM2,
        smooth: bool = True,
        amp: bool = False,
        work_dir: str | None = None,
        buffer_size: int = 2,
        device: torch.device | str | None = None,
        workers: int | None = None,
    ):
        super().__init__()
        self.splitter = splitter
        self.batch_size = int(batch_size)
        self.blend, self.sigma_scale = blend, sigma_scale
        self.probability_factor = int(probability_factor) if probability_factor else None
        self.min_object_um2, self.max_hole_um2 = float(min_object_um2), float(max_hole_um2)
        self.smooth, self.amp = smooth, amp
        self.work_dir, self.buffer_size, self.device = work_dir, buffer_size, device
        self.workers = workers or default_workers()
        # the cleanup runs after the last tile, when the network's core is free too
        self.cleanup_workers = workers or os.cpu_count() or 1

    def __call__(self, inputs, network, *args, **kwargs) -> StitchResult:
        start = time.perf_counter()
        plan = inputs if isinstance(inputs, TilePlan) else self.splitter.plan(inputs)
        planned_s = time.perf_counter() - start
        grid = plan.grid
        labels = ChunkedMask(plan.shape, grid.stride, self.work_dir, "labels")
        probability = self._probability_store(plan)
        components = SlideComponents(plan.cells, (grid.rows, grid.cols), *self.cleanup_px(plan))
        stitcher = Stitcher(
            grid,
            plan.cells,
            labels,
            components,
            blend=self.blend,
            smooth=self.smooth,
            sigma_scale=self.sigma_scale,
            probability=probability,
            probability_factor=self.probability_factor or 1,
            workers=self.workers,
        )
        result = StitchResult(plan, labels, [], probability)
        try:
            stats = {"tiles": 0}
            if plan.cells:
                patches = PatchInferer(
                    splitter=self.splitter,
                    merger_cls=CellMerger,
                    stitcher=stitcher,  # PatchInferer hands extra keywords to the merger
                    batch_size=self.batch_size,
                    postprocessing=self._postprocessing(probability is not None),
                    buffer_size=self.buffer_size,
                )
                with torch.inference_mode():
                    stats = patches(plan, self._runner(network), *args, **kwargs)
            else:
                stitcher.finish()
            tiles_s = time.perf_counter() - start - planned_s
            result.objects = self._cleanup(plan, labels, components)
            result.stats = stats | {
                "plan_s": planned_s,
                "tiles_s": tiles_s,
                "cleanup_s": time.perf_counter() - start - planned_s - tiles_s,
            }
        except BaseException:
            with contextlib.suppress(Exception):
                stitcher.abort()
            result.close()
            raise
        return result

    # ---- pieces ------------------------------------------------------------------------------

    def cleanup_px(self, plan: TilePlan) -> tuple[int, int]:
        """Object and hole thresholds in pixels at the inference level (0, 0 without an mpp)."""
        mpp = plan.slide.mpp
        if mpp is None:
            if self.min_object_um2 > 0 or self.max_hole_um2 > 0:
                logger.warning("%s: no mpp, so small objects and holes are not cleaned up", plan.slide.path)
            return 0, 0
        px_um2 = mpp[0] * mpp[1] * plan.downsample**2
        return round(max(0.0, self.min_object_um2) / px_um2), round(max(0.0, self.max_hole_um2) / px_um2)

    def _cleanup(self, plan: TilePlan, labels: ChunkedMask, components: SlideComponents) -> list:
        drop, fill = components.decide()

        def clean(cell):
            if not components.changed(*cell, drop, fill):
                return
            values = labels.get(*cell)
            values = np.zeros(labels.chunk_shape(*cell), np.uint8) if values is None else values
            local, lf, lb = label_cell(values)
            changes = components.changes(*cell, local, drop, fill)
            labels.put(*cell, apply_changes(values, lf, lb, *changes, components.max_hole_px))

        with ThreadPoolExecutor(self.cleanup_workers, thread_name_prefix="cleanup") as pool:
            list(pool.map(clean, plan.cells))
        return components.objects(drop)

    def _probability_store(self, plan: TilePlan) -> ChunkedMask | None:
        k = self.probability_factor
        if not k:
            return None
        sy, sx = plan.grid.stride
        if sy % k or sx % k:
            raise ValueError(f"probability_factor {k} must divide the tile stride {plan.grid.stride}")
        shape = tuple(-(-s // k) for s in plan.shape)
        return ChunkedMask(shape, (sy // k, sx // k), self.work_dir, "probability")

    def _postprocessing(self, keep_probability: bool):
        needs_probs = self.blend != "crop" or keep_probability

        def post(logits: torch.Tensor) -> torch.Tensor:
            if needs_probs:
                return torch.softmax(logits.float(), dim=1)
            if logits.shape[1] == 2:  # ties go to background, as argmax's first-wins rule
                return (logits[:, 1:] > logits[:, :1]).to(torch.uint8)
            if logits.is_cuda:
                return logits.argmax(dim=1, keepdim=True).to(torch.uint8)
            return logits.float()  # the stitcher's per-class pass is ~10x torch's CPU argmax

        return post

    def _runner(self, network):
        device = torch.device(self.device) if self.device is not None else next(network.parameters()).device

        def run(batch):
            # uint8 crosses to the device (4x less than float), then becomes [0, 1] floats there
            batch = batch.to(device, non_blocking=True).float().div_(255.0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
                return network(batch)

        return run
