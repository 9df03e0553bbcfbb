"""Issue 15: where in the net is the decoys' tell? A linear probe on each stage's features.

    python benchmarks/context_probe.py --checkpoint RUN/model.pt --train DIR --test DIR [--out FILE.json]

The 2048-px net calls decoys glomeruli, and its own P(decoy) has no tell (`decoy_probability.py`, AUC
~0.5), though a hand-made orientation measure tells them apart at 1-2 mm (`context_signal.py`, AUC
~0.83). This asks whether the tell reaches the net's features at all, stage by stage. For every
object of the training and held-out decoy slides (their sidecars give where each object is), the
patch of the checkpoint's size and scale centred on the object goes through the net in eval mode.
Each feature map is pooled over the field (tissue, outside every object's disk): per channel, the
mean, the standard deviation over the map's pixels, and the standard deviation across 8 x 8 blocks
of the field of the channel's block means. Where the field's tubules turn, orientation-selective
channels drift across it, so the block spread is a second-order statistic at the scale of the tell
(the texture's pixel-scale variation averaged out first) that a linear probe can read.

The probe is a shrinkage linear discriminant (closed form; its shrinkage is picked by leave-one-slide-
out on the training slides), fitted on the training slides' objects and scored on the held-out
slides' objects: AUC 0.5 means no linear read-out of the pooled features finds the tell. The same is
done for the same architecture with random weights (what training added) and, as the yardstick, for
the hand-made measure R on the same fields (1-D, no fitting).

Stages, in the order the data flows: skip<s> (the tokenizer's continuous encoder features at stride
s), pre_quant (the encoder's output before the codebook, stride 16), tokens (after the codebook),
stage<i> (the ViT stages).
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
import torch
import torch.nn.functional as F
from scipy.stats import mannwhitneyu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from context_signal import OBJECT_MARGIN, TENSOR_SIGMA_PX, orientation_field  # the same disks and R

from custom.checkpoints import config_from_checkpoint, load_weights, read_checkpoint
from custom.io import write_atomic
from custom.networks import build_network
from custom.wsi.reader import open_slide

BLOCKS = 8  # 8 x 8 blocks of the field: 256 um each at a 2048-um field
# which of a stage's pooled figures (C means, C pixel sds, C block sds) a probe reads
POOLINGS = {"all": lambda c: slice(0, 3 * c), "block spread": lambda c: slice(2 * c, 3 * c)}
SHRINKAGE = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # x the mean variance, added to the covariance's diagonal


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a model.pt of context.py (any class count)")
    parser.add_argument(
        "--train", required=True, help="decoy slides with <id>_objects.json sidecars: the fit"
    )
    parser.add_argument("--test", required=True, help="held-out decoy slides: the score")
    parser.add_argument("--out", help="also write every figure here (JSON)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many objects per slide (0: all)")
    parser.add_argument("--random-seed", type=int, default=0, help="torch seed of the random-weights control")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("HOLOHISTO_THREADS", torch.get_num_threads())))
    start = time.perf_counter()
    ckpt = read_checkpoint(Path(args.checkpoint))
    config, trained = config_from_checkpoint(ckpt), ckpt.get("input_config", {})
    side, mpp = int(trained["patch_size"][0]), float(trained["patch_mpp"])
    trained_net = build_network(config, load_tokenizer_checkpoint=False)
    torch.manual_seed(args.random_seed)
    nets = {
        "trained": load_weights(trained_net, args.checkpoint, ckpt).eval(),
        "random weights": build_network(config, load_tokenizer_checkpoint=False).eval(),
    }
    pooled = {"train": [], "test": []}
    for split, folder in (("train", Path(args.train)), ("test", Path(args.test))):
        for sidecar in sorted(folder.glob("*_objects.json")):
            pooled[split] += slide_objects(sidecar, nets, side, mpp, args.limit)
            print(f"{sidecar.name}: {len(pooled[split])} {split} objects so far", flush=True)
    result = {
        "checkpoint": str(args.checkpoint),
        "side_px": side,
        "mpp": mpp,
        "field_um": side * mpp,
        "objects": {s: len(v) for s, v in pooled.items()},
        "decoys": {s: sum(o["decoy"] for o in v) for s, v in pooled.items()},
        "hand_made_R_auc": {
            s: auc([o["R"] for o in v], [o["decoy"] for o in v])
            for s, v in (*pooled.items(), ("every slide", pooled["train"] + pooled["test"]))
        },
        "random_seed": args.random_seed,
        "probes": {
            part: {
                name: {
                    stage: probe(pooled, name, stage, part) for stage in pooled["train"][0]["features"][name]
                }
                for name in nets
            }
            for part in POOLINGS
        },
        "pooled": pooled,  # every object's features, to probe again without the nets
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.out:
        write_atomic(Path(args.out), lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    print(report(result))


def slide_objects(sidecar: Path, nets: dict, side: int, mpp: float, limit: int) -> list[dict]:
    """Per object of one slide: its label, the hand-made R and every net's pooled features over its field."""
    meta = json.loads(sidecar.read_text())
    objects = meta["objects"][:limit] if limit else meta["objects"]
    rows = []
    with open_slide(sidecar.parent / f"{meta['slide_id']}_wsi.tiff") as slide:
        level = slide.level_for_mpp(mpp)
        ds = slide.downsamples[level]
        for obj in objects:
            y0, x0 = (round(obj[c] - side * ds / 2) for c in ("cy", "cx"))
            rgb = slide.read_region((y0, x0), (side, side), level)
            c, s, tissue = orientation_field(rgb, TENSOR_SIGMA_PX)
            field = tissue & ~object_disks(meta["objects"], (y0, x0), ds, rgb.shape[:2])
            weight = field.astype(np.float32)
            R = float(np.hypot((weight * c).sum(), (weight * s).sum()) / max(weight.sum(), 1.0))
            x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(255.0)[None]
            features = {name: pool(stage_features(net, x), field) for name, net in nets.items()}
            rows.append(
                {"slide": meta["slide_id"], "decoy": obj["label"] == "decoy", "R": R, "features": features}
            )
    return rows


def object_disks(
    objects: list[dict], origin: tuple[int, int], ds: float, shape: tuple[int, int]
) -> np.ndarray:
    """Every object's disk (1.3 x its max radius) in a patch whose top-left is `origin` (level 0)."""
    yy = (np.arange(shape[0]) + 0.5)[:, None] * ds + origin[0]
    xx = (np.arange(shape[1]) + 0.5)[None, :] * ds + origin[1]
    disks = np.zeros(shape, bool)
    for o in objects:
        r = o["max_radius"] * OBJECT_MARGIN
        if abs(o["cy"] - origin[0] - shape[0] * ds / 2) > shape[0] * ds / 2 + r:
            continue
        if abs(o["cx"] - origin[1] - shape[1] * ds / 2) > shape[1] * ds / 2 + r:
            continue
        disks |= (yy - o["cy"]) ** 2 + (xx - o["cx"]) ** 2 <= r * r
    return disks


@torch.inference_mode()
def stage_features(net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The net's features along the token path, as `HoloHistoNet.forward_features` computes them."""
    tokenizer = net.tokenizer
    quantize = tokenizer.quantize.forward
    # one encoder pass gives both sides of the codebook: hand the continuous vectors on, keep the codes
    tokenizer.quantize.forward = lambda z: quantize(z)._replace(quantized=z)
    try:
        out = tokenizer(x * 2 - 1, net.skip_strides)
    finally:
        tokenizer.quantize.forward = quantize
    features = {f"skip{s}": skip for s, skip in zip(net.skip_strides, out.skips, strict=True)}
    features["pre_quant"] = out.tokens
    tokens = tokenizer.quantize.embed(out.indices)
    features["tokens"] = tokens
    h = net.token_embed(tokens)
    for i, stage in enumerate(net.stages):
        h = stage(h)
        features[f"stage{i}"] = h
    return features


def pool(features: dict[str, torch.Tensor], field: np.ndarray) -> dict[str, list[float]]:
    """Per map and channel, over the field: the mean, the standard deviation over the map's pixels, and
    the standard deviation of the means of BLOCKS x BLOCKS blocks (how a channel drifts across the field,
    with the texture's pixel-scale variation averaged out first)."""
    mask = torch.from_numpy(field.astype(np.float32))[None, None]
    pooled = {}
    for name, fmap in features.items():
        cover = F.adaptive_avg_pool2d(mask, fmap.shape[-2:])[0, 0]
        w = cover > 0.5
        values = fmap[0][:, w] if w.any() else fmap[0].flatten(1)
        weight = w.float()[None, None]
        block_sum = F.adaptive_avg_pool2d(fmap * weight, BLOCKS)[0]
        block_cover = F.adaptive_avg_pool2d(weight, BLOCKS)[0, 0]
        full = block_cover > 0.25  # blocks at least a quarter field
        block_means = block_sum[:, full] / block_cover[full] if full.sum() > 1 else block_sum.flatten(1)
        pooled[name] = torch.cat([values.mean(1), values.std(1), block_means.std(1)]).tolist()
    return pooled


def probe(pooled: dict, net: str, stage: str, part: str = "all") -> dict:
    """Fit the shrinkage discriminant on the training objects, score the held-out ones.

    Also `every_slide_auc`: each of all the slides scored by a probe fitted on the others (the
    shrinkage picked on those others alone), so that no slide's size or edges sit only on one side.
    """

    def data(rows):
        X = np.array([r["features"][net][stage] for r in rows])
        return X[:, POOLINGS[part](X.shape[1] // 3)], np.array([r["decoy"] for r in rows])

    X, y = data(pooled["train"])
    slides = np.array([r["slide"] for r in pooled["train"]])
    best, cv = pick_shrinkage(X, y, slides)
    Xt, yt = data(pooled["test"])
    Xa, ya = data(pooled["train"] + pooled["test"])
    every = np.array([r["slide"] for r in pooled["train"] + pooled["test"]])
    scores = np.zeros(len(ya))
    for s in np.unique(every):
        fit = every != s
        lam, _ = pick_shrinkage(Xa[fit], ya[fit], every[fit])
        scores[~fit] = discriminant(Xa[fit], ya[fit], lam)(Xa[~fit])
    return {
        "dims": int(X.shape[1]),
        "shrinkage": best,
        "cv_auc": cv,
        "test_auc": auc(discriminant(X, y, best)(Xt), yt),
        "every_slide_auc": auc(scores, ya),
    }


def pick_shrinkage(X: np.ndarray, y: np.ndarray, slides: np.ndarray) -> tuple[float, float]:
    """The shrinkage with the best leave-one-slide-out AUC, and that AUC."""
    cv = {}
    for lam in SHRINKAGE:
        scores = np.zeros(len(y))
        for s in np.unique(slides):
            fit = slides != s
            scores[~fit] = discriminant(X[fit], y[fit], lam)(X[~fit])
        cv[lam] = auc(scores, y)
    best = max(cv, key=cv.get)
    return best, cv[best]


def discriminant(X: np.ndarray, y: np.ndarray, lam: float):
    """Fisher's discriminant with the covariance shrunk towards lam x the mean variance; features standardised."""
    mu, sd = X.mean(0), X.std(0) + 1e-8
    Z = (X - mu) / sd
    cov = np.cov(Z[y], rowvar=False) * y.sum() + np.cov(Z[~y], rowvar=False) * (~y).sum()
    cov = np.atleast_2d(cov) / len(y)
    cov += lam * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    w = np.linalg.solve(cov, Z[y].mean(0) - Z[~y].mean(0))
    return lambda Xn: ((Xn - mu) / sd) @ w


def auc(scores, decoy) -> float:
    """The chance that a decoy scores above a glomerulus."""
    scores, decoy = np.asarray(scores, float), np.asarray(decoy, bool)
    return float(mannwhitneyu(scores[decoy], scores[~decoy]).statistic / (decoy.sum() * (~decoy).sum()))


def report(r: dict) -> str:
    lines = [
        f"{r['checkpoint']}: {r['side_px']} px at {r['mpp']} um/px ({r['field_um']:.0f} um field); "
        f"objects train {r['objects']['train']} ({r['decoys']['train']} decoys), "
        f"held out {r['objects']['test']} ({r['decoys']['test']} decoys); {r['machine']}; {r['seconds']:.0f} s",
        f"hand-made R: AUC train {r['hand_made_R_auc']['train']:.3f}, held out {r['hand_made_R_auc']['test']:.3f}, "
        f"every slide {r['hand_made_R_auc']['every slide']:.3f}",
        f"random weights: torch seed {r['random_seed']}",
        "| pooling | stage | dims | trained: CV | trained: held out | trained: every slide "
        "| random: CV | random: held out | random: every slide |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for part, probes in r["probes"].items():
        for stage, t in probes["trained"].items():
            u = probes["random weights"][stage]
            lines.append(
                f"| {part} | {stage} | {t['dims']} | {t['cv_auc']:.3f} | {t['test_auc']:.3f} "
                f"| {t['every_slide_auc']:.3f} | {u['cv_auc']:.3f} | {u['test_auc']:.3f} | {u['every_slide_auc']:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
