"""Is the decoys' tell in the pixels, and over what field of view? A measurement with no network.

    python benchmarks/context_signal.py --out DIR [--slides 6] [--fields 128 256 512 1024 2048]

The synthetic decoy slides (`python -m custom synth --decoys`) paint decoys exactly as glomeruli and put
them in a medulla whose tubules keep one orientation, while the cortex's tubules turn (~0.3 rad per
256 um, 2-3 rad per 2 mm: custom/synth/scene.py). benchmarks/context.py found that a tiny net at a
2048-um field calls the decoys glomeruli as often as 512-px tiles do. This script asks the question
before that one: how well can the tell be read at each field at all, by a fixed, hand-made measure?

For each held-out slide (the context benchmark's quick held-out slides: 12288 x 8192, seeds 901..,
read at 1 um/px), the local tubule orientation is the structure tensor's (gradients at sigma 1.5 px,
averaged over sigma 8 px), as a doubled-angle unit vector weighted by its coherence. Around every
object, over a square field of side F um on tissue and outside every object's disk, the measure is the
resultant length R of those vectors: 1 where the orientation is the same throughout, lower where it
turns. Printed per field: mean R for decoys and for glomeruli and the AUC of R for telling them apart
(1.0: every decoy's field is more uniform than every glomerulus's; 0.5: no tell). The AUC bounds what
a network could read from orientation at that field; it is not a network's score.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.stats import mannwhitneyu

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: `custom` lives in the repository root

from custom.synth import write_synthetic_slides  # noqa: E402
from custom.wsi.reader import open_slide  # noqa: E402

SLIDE_SIZE = (12288, 8192)  # benchmarks/context.py's quick held-out slides
FIRST_SEED = 901
GLOMERULUS_UM = (60.0, 150.0)
LEVEL = 2  # 1 um/px on the 0.25 um/px synthetic slides
GRADIENT_SIGMA_PX = 1.5
TENSOR_SIGMA_PX = 8.0  # ~1/6 of the tubule spacing: one tubule wall's orientation
GLASS_GREY = 225  # mean RGB above this is glass
OBJECT_MARGIN = 1.3  # object disks (x their radius) left out of every field


def orientation_field(rgb: np.ndarray, tensor_sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(cos 2t, sin 2t) of the local orientation, each times its coherence, and the tissue mask."""
    grey = rgb.astype(np.float32).mean(axis=2)
    gy = ndimage.gaussian_filter(grey, GRADIENT_SIGMA_PX, order=(1, 0))
    gx = ndimage.gaussian_filter(grey, GRADIENT_SIGMA_PX, order=(0, 1))
    jxx = ndimage.gaussian_filter(gx * gx, tensor_sigma)
    jyy = ndimage.gaussian_filter(gy * gy, tensor_sigma)
    jxy = ndimage.gaussian_filter(gx * gy, tensor_sigma)
    c, s = jxx - jyy, 2 * jxy
    norm = jxx + jyy + 1e-6  # |(c, s)| / trace is the coherence, so (c, s) / trace = coherence x unit vector
    return c / norm, s / norm, grey < GLASS_GREY


def box_sums(values: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero first row and column: any box's sum in four lookups."""
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), np.float64)
    table[1:, 1:] = values.cumsum(0).cumsum(1)
    return table


def box(table: np.ndarray, y0: int, x0: int, y1: int, x1: int) -> float:
    h, w = table.shape[0] - 1, table.shape[1] - 1
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
    if y1 <= y0 or x1 <= x0:
        return 0.0
    return float(table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0])


def slide_measures(wsi: Path, objects: list[dict], fields_px: list[int], tensor_sigma: float) -> list[dict]:
    with open_slide(wsi) as slide:
        rgb = slide.read_level(LEVEL)
        ds = slide.downsamples[LEVEL]
    c, s, tissue = orientation_field(rgb, tensor_sigma)
    weight = tissue.astype(np.float32)
    yy, xx = np.ogrid[: weight.shape[0], : weight.shape[1]]
    for o in objects:  # every object's own texture is no part of anyone's context
        cy, cx, r = o["cy"] / ds, o["cx"] / ds, o["max_radius"] / ds * OBJECT_MARGIN
        y0, y1 = int(max(cy - r, 0)), int(min(cy + r + 1, weight.shape[0]))
        x0, x1 = int(max(cx - r, 0)), int(min(cx + r + 1, weight.shape[1]))
        disk = (yy[y0:y1] - cy) ** 2 + (xx[:, x0:x1] - cx) ** 2 <= r * r
        weight[y0:y1, x0:x1][disk] = 0
    tables = [box_sums(weight * c), box_sums(weight * s), box_sums(weight)]
    rows = []
    for o in objects:
        cy, cx = o["cy"] / ds, o["cx"] / ds
        resultant = {}
        for side in fields_px:
            y0, x0 = round(cy - side / 2), round(cx - side / 2)
            sc, ss, sw = (box(t, y0, x0, y0 + side, x0 + side) for t in tables)
            resultant[side] = float(np.hypot(sc, ss) / sw) if sw > 0 else float("nan")
        rows.append({"label": o["label"], "resultant": resultant})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--slides", type=int, default=6)
    parser.add_argument("--tensor-sigma", type=float, default=TENSOR_SIGMA_PX, help="px at 1 um/px")
    parser.add_argument("--fields", type=int, nargs="+", default=[128, 256, 512, 1024, 2048], help="um")
    args = parser.parse_args()
    out = Path(args.out)
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    start = time.perf_counter()
    slides = out / "slides"
    results = []
    for seed in range(FIRST_SEED, FIRST_SEED + args.slides):
        wsi, sidecar = slides / f"synth_{seed}_wsi.tiff", slides / f"synth_{seed}_objects.json"
        if not sidecar.exists():
            (made,) = write_synthetic_slides(
                slides, count=1, width=SLIDE_SIZE[0], height=SLIDE_SIZE[1], seed=seed,
                glomerulus_um=GLOMERULUS_UM, decoys=True, progress=False,
            )  # fmt: skip
            wsi, sidecar = made.wsi_path, made.objects_path
        record = json.loads(sidecar.read_text())
        um_per_px = record["mpp"] * 2**LEVEL
        fields_px = [round(f / um_per_px) for f in args.fields]
        results += slide_measures(wsi, record["objects"], fields_px, args.tensor_sigma)
        print(f"slide {seed}: {len(record['objects'])} objects", flush=True)
    table = ["| field | decoys: mean R | glomeruli: mean R | AUC (decoy R > glomerulus R) | objects |"]
    table.append("| --- | --- | --- | --- | --- |")
    summary = {}
    for field_um, side in zip(args.fields, fields_px, strict=True):
        decoy = np.array([r["resultant"][side] for r in results if r["label"] == "decoy"])
        glom = np.array([r["resultant"][side] for r in results if r["label"] == "glomerulus"])
        decoy, glom = decoy[np.isfinite(decoy)], glom[np.isfinite(glom)]
        auc = mannwhitneyu(decoy, glom).statistic / (decoy.size * glom.size)
        summary[field_um] = {"decoy_mean": decoy.mean(), "glomerulus_mean": glom.mean(), "auc": auc}
        table.append(
            f"| {field_um} um | {decoy.mean():.3f} | {glom.mean():.3f} | {auc:.3f} | {decoy.size} + {glom.size} |"
        )
    print("\n".join(table))
    print(f"{time.perf_counter() - start:.0f} s")
    (out / "context_signal.json").write_text(json.dumps({"fields": summary, "objects": results}, indent=1))


if __name__ == "__main__":
    main()
