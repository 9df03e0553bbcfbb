"""The three segmentation arms of tokenizer_comparison.py again with another seed (same tokenizer files, same steps).

python benchmarks/tokenizer_comparison_seed.py --slides SLIDES/train --held_out SLIDES/held_out --out RUN --seed 1
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere
import tokenizer_comparison as compare

from custom.data.datalists import load_items

ap = argparse.ArgumentParser()
ap.add_argument("--slides", required=True)
ap.add_argument("--held_out", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--seed", type=int, required=True)
ap.add_argument("--seg_epochs", type=int, default=6)
args = ap.parse_args()
torch.set_num_threads(1)
out = Path(args.out)
held_out = compare.images(
    load_items(args.held_out, ""), compare.MEASURE_PATCHES, compare.MEASURE_PX, compare.SEED
)
results = {}
for name, (ckpt, freeze) in compare.segmentation_arms(out).items():
    run_dir = out / f"seed{args.seed}_seg_{name.split(',')[0].split(' ')[0]}"
    results[name] = compare.train_arm(args.slides, run_dir, args.seed, args.seg_epochs, ckpt, freeze)
    tok = compare.tokenizer_from_seg(run_dir / "final.pt")
    results[name]["perplexity"], results[name]["used_codes"] = compare.usage(tok, held_out)
    print(name, results[name], flush=True)
(out / f"summary_seed{args.seed}.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results, indent=2))
