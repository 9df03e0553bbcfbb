"""The three segmentation arms of tokenizer_comparison.py again with another seed (same tokenizer files, same steps).

python benchmarks/tokenizer_comparison_seed.py --slides SLIDES/train --held_out SLIDES/held_out --out RUN --seed 1
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere
import tokenizer_comparison as compare

from custom.bundle import workflow
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
arms = {
    "random, frozen": (str(out / "random_tokenizer.pt"), True),
    "pathology-trained, frozen": (str(out / "pathology_tokenizer" / "tokenizer.pt"), True),
    "trainable (random init)": (None, False),
}
results = {}
for name, (ckpt, freeze) in arms.items():
    run_dir = out / f"seed{args.seed}_seg_{name.split(',')[0].split(' ')[0]}"
    t = time.perf_counter()
    flow = workflow(
        ["train", "tiny"],
        "train",
        dataset_dir=args.slides,
        output_dir=str(run_dir),
        seed=args.seed,
        max_epochs=args.seg_epochs,
        tokenizer_checkpoint=ckpt,
        freeze_tokenizer=freeze,
    )
    flow.run()
    evaluator = flow.parser.get_parsed_content("validate#evaluator")
    tok = compare.tokenizer_from_seg(run_dir / "final.pt")
    perplexity, used = compare.usage(tok, held_out)
    results[name] = {
        "best_dice": float(evaluator.state.best_metric),
        "last_dice": float(evaluator.state.metrics["val_mean_dice"]),
        "steps": int(flow.parser.get_parsed_content("train#trainer").state.iteration),
        "perplexity": perplexity,
        "used_codes": used,
        "seg_s": time.perf_counter() - t,
    }
    print(name, results[name], flush=True)
(out / f"summary_seed{args.seed}.json").write_text(json.dumps(results, indent=2))
print(json.dumps(results, indent=2))
