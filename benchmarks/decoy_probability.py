"""Issue 15: does a net see the decoys at all, below the 50 % area threshold?

Decoy rejection counts a decoy as rejected only when under half its area is called glomerulus. This
looks at what the net itself believes. For every decoy and glomerulus of held-out decoy slides (their
sidecars give the exact outlines), the patch of the checkpoint's size and scale centred on the object
is read and the net runs *unfolded*. Then P(decoy) / (P(decoy) + P(glomerulus)) is averaged over the
object's pixels. A 2-class net (decoys trained as background) is scored by P(background) instead,
the same question without a class to ask it with. The AUC is the chance that a decoy scores higher
than a glomerulus: 0.5 means the net cannot tell them apart, and 1.0 means some threshold separates every pair. The centred patch is the
most context the net ever gets, more than a tile at the slide's edge.

    python benchmarks/decoy_probability.py --checkpoint RUN/model.pt --slides DIR [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import mannwhitneyu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import object_inside

from custom.checkpoints import config_from_checkpoint, load_weights, read_checkpoint
from custom.errors import ConfigError
from custom.io import write_atomic
from custom.networks import build_network
from custom.wsi.reader import open_slide

DECOY_CLASS = 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a model.pt: 2 classes, or 3 with hard_negative_class.json"
    )
    parser.add_argument("--slides", required=True, help="decoy slides with their <id>_objects.json sidecars")
    parser.add_argument("--out", default=None, help="also write the per-object figures here (JSON)")
    args = parser.parse_args(argv)
    result = decoy_scores(Path(args.checkpoint), Path(args.slides))
    if args.out:
        write_atomic(Path(args.out), lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
    print(report(result))


def decoy_scores(checkpoint: Path, slides: Path) -> dict:
    ckpt = read_checkpoint(checkpoint)
    config, trained = config_from_checkpoint(ckpt), ckpt.get("input_config", {})
    if config.get("num_classes", 2) not in (2, 3):
        raise ConfigError(
            f"{checkpoint}: a 2-class net or a 3-class one (hard_negative_class.json) is needed, not {config}"
        )
    net = load_weights(build_network(config, load_tokenizer_checkpoint=False), checkpoint, ckpt).eval()
    side = int(trained["patch_size"][0])
    objects = []
    for sidecar in sorted(slides.glob("*_objects.json")):
        meta = json.loads(sidecar.read_text())
        with open_slide(slides / f"{meta['slide_id']}_wsi.tiff") as slide:
            level = slide.level_for_mpp(trained["patch_mpp"])
            ds = slide.downsamples[level]
            for obj in meta["objects"]:
                y0, x0 = (round(obj[c] - side * ds / 2) for c in ("cy", "cx"))
                rgb = slide.read_region((y0, x0), (side, side), level)
                share = _decoy_share(net, rgb)
                rows, cols, inside = object_inside(
                    dict(obj, cx=obj["cx"] - x0, cy=obj["cy"] - y0), share.shape, ds, ds
                )
                objects.append({
                    "slide": meta["slide_id"], "id": obj["id"], "label": obj["label"],
                    "decoy_share": float(share[rows, cols][inside].mean()),
                })  # fmt: skip
    decoy = np.array([o["decoy_share"] for o in objects if o["label"] == "decoy"])
    glom = np.array([o["decoy_share"] for o in objects if o["label"] == "glomerulus"])
    auc = mannwhitneyu(decoy, glom).statistic / (decoy.size * glom.size)
    return {
        "checkpoint": str(checkpoint), "side_px": side, "mpp": trained["patch_mpp"], "auc": float(auc),
        "decoy_mean": float(decoy.mean()), "glomerulus_mean": float(glom.mean()),
        "decoys": int(decoy.size), "glomeruli": int(glom.size), "objects": objects,
    }  # fmt: skip


@torch.no_grad()
def _decoy_share(net: torch.nn.Module, rgb: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(255.0)[None]
    p = net(x).softmax(1)[0]
    if p.shape[0] == 2:  # decoys trained as background: how little it believes them glomeruli
        return p[0].numpy()
    return (p[DECOY_CLASS] / (p[1] + p[DECOY_CLASS]).clamp_min(1e-6)).numpy()


def report(r: dict) -> str:
    return (
        f"{r['checkpoint']} ({r['side_px']} px at {r['mpp']} um/px, unfolded): mean decoy score inside "
        f"{r['decoys']} decoys {r['decoy_mean']:.3f}, inside {r['glomeruli']} glomeruli "
        f"{r['glomerulus_mean']:.3f}; AUC {r['auc']:.3f} (0.5: no tell)"
    )


if __name__ == "__main__":
    main()
