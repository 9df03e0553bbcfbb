"""The fixed orientation-context branch (custom/networks/orientation_context.py): its box sums, its maps
on stripes of known orientation, and on a synthetic decoy slide, where its 1-mm map must rank the
decoys' medulla above the glomeruli's cortex."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from custom.networks.orientation_context import TURNING_FLOOR, OrientationContext, box_sum
from custom.synth import write_synthetic_slides
from custom.wsi.reader import open_slide

CELL = 16


def uniformity(maps: torch.Tensor) -> torch.Tensor:
    """R per field back from the branch's log-turning maps (the last map is the tissue fraction)."""
    return 1 + TURNING_FLOOR - maps[..., :-1, :, :].exp()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("side", [1, 2, 5, 8, 40])
def test_box_sum_is_the_clipped_window_sum(side):
    x = torch.rand(2, 3, 13, 17, dtype=torch.float64)
    got = box_sum(x, side)
    before, after = side // 2, side - side // 2
    want = torch.zeros_like(x)
    for i in range(13):
        for j in range(17):
            window = x[..., max(i - before, 0) : i + after, max(j - before, 0) : j + after]
            want[..., i, j] = window.sum((-2, -1))
    torch.testing.assert_close(got, want)


def stripes(side: int, angle_at, period_px: float = 24.0, band_px: int = 32) -> torch.Tensor:
    """Grey stripes on the net's [-1, 1] scale, tissue everywhere. The stripes of each band_px x band_px
    block run at angle_at(block centre y, x) radians, so the orientation is known exactly everywhere."""
    coords = torch.arange(side, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centres = (coords // band_px + 0.5) * band_px
    theta = angle_at(*torch.meshgrid(centres, centres, indexing="ij"))
    phase = 2 * math.pi / period_px * (-torch.sin(theta) * xx + torch.cos(theta) * yy)
    grey = 0.3 * torch.cos(phase)  # well below the glass grey
    return grey.float().expand(1, 3, side, side).clone()


def test_one_orientation_throughout_reads_uniform_at_every_field():
    context = OrientationContext()
    maps = context(stripes(512, lambda y, x: torch.full_like(x, 0.5)))
    assert maps.shape == (1, context.out_channels, 512 // CELL, 512 // CELL)
    assert uniformity(maps).min() > 0.97
    tissue = maps[0, -1]
    # The largest field (128 cells) is clipped to the 32-cell patch: the centre sees all of it.
    assert tissue[16, 16] == pytest.approx((32 / 128) ** 2, rel=1e-4)


def test_turning_orientation_reads_less_uniform_the_larger_the_field():
    context = OrientationContext()
    side = 2048  # at 1 um/px the orientation turns by pi per mm, along x
    maps = context(stripes(side, lambda y, x: math.pi * x / 1024))[0]
    centre = uniformity(maps)[:, 64, 64]
    assert centre[0] > 0.9  # 256 um: the axis turns ~0.8 rad
    assert centre[0] > centre[1] + 0.2 > centre[2] + 0.4  # 512 um: ~1.6 rad; 1 mm: a half turn
    assert centre[2:].max() < 0.3


def test_glass_and_padding_weigh_nothing():
    context = OrientationContext()
    image = stripes(512, lambda y, x: torch.full_like(x, 1.0))
    image[..., :, 256:] = 1.0  # white: the net's padding value, and glass
    maps = context(image)[0]
    assert torch.isfinite(maps).all()
    assert uniformity(maps)[:, :, :8].min() > 0.97  # the tissue half reads its own orientation
    # 4 cells of glass from the edge plus half the 16-cell field: no tissue in it, so R = 0, never NaN
    assert torch.allclose(uniformity(maps)[0, :, 28:], torch.zeros(()), atol=1e-6)
    assert maps[-1, :, 28:].min() > 0  # while the 2-mm field still reaches the tissue
    blank = context(torch.ones(1, 3, 256, 256))
    assert torch.allclose(uniformity(blank), torch.zeros(()), atol=1e-6)
    assert torch.equal(blank[:, -1], torch.zeros_like(blank[:, -1]))


def test_the_one_mm_map_ranks_decoys_above_glomeruli_on_a_decoy_slide(tmp_path):
    """Decoys sit in a medulla whose tubules keep one orientation, glomeruli in a cortex whose tubules
    turn (custom/synth/scene.py). At 1 um/px the branch's 1-mm field must tell them apart."""
    (slide,) = write_synthetic_slides(
        tmp_path, count=1, width=12288, height=8192, seed=903, glomerulus_um=(60.0, 150.0), decoys=True,
        progress=False,
    )  # fmt: skip
    record = json.loads(slide.objects_path.read_text())
    with open_slide(slide.wsi_path) as wsi:
        rgb = wsi.read_level(2)  # 1 um/px
        downsample = wsi.downsamples[2]
    image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 127.5 - 1
    height, width = (s // CELL * CELL for s in image.shape[-2:])
    maps = OrientationContext()(image[..., :height, :width])[0]
    one_mm = OrientationContext().field_cells.index(64)
    score = {"decoy": [], "glomerulus": []}
    for o in record["objects"]:
        i = min(int(o["cy"] / downsample) // CELL, maps.shape[1] - 1)
        j = min(int(o["cx"] / downsample) // CELL, maps.shape[2] - 1)
        score[o["label"]].append(float(uniformity(maps)[one_mm, i, j]))
    decoys, glomeruli = score["decoy"], score["glomerulus"]
    assert len(decoys) >= 5 and len(glomeruli) >= 5
    auc = mannwhitneyu(decoys, glomeruli).statistic / (len(decoys) * len(glomeruli))
    assert auc > 0.8
