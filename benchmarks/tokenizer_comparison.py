"""Three tokenizers, one tiny segmentation recipe: random frozen, pathology-trained frozen, trainable.

    python benchmarks/tokenizer_comparison.py --slides SLIDES/train --held_out SLIDES/held_out \
        --out RUN [--seg_epochs 6] [--tokenizer_epochs 6] [--probe_steps 100] [--threads 1]

1. trains the pathology tokenizer with configs/train_tokenizer.json + train_tokenizer_tiny.json;
2. writes the random tokenizer: the tiny tokenizer at its seeded random init, codebook set by k-means of
   its own encoder outputs on training patches (a random codebook at taming's init maps nearly every
   token to one code, measured and printed below);
3. trains the tiny segmentation net (configs/train.json + tiny.json) three times, same seed and steps,
   with tokenizer_checkpoint / freeze_tokenizer overrides;
4. on held-out patches: codebook perplexity of each run's final tokenizer; PSNR of the pathology VQGAN's
   own decoder; and, for all three, PSNR of a decoder probe: a fresh tiny decoder trained for the same
   steps on each frozen tokenizer's quantized tokens (L1), which measures how much of the image the
   tokens keep when a tokenizer has no decoder of its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from custom.bundle import workflow
from custom.data.datalists import load_items, split_by_slide
from custom.data.patches import FixedTissuePatchDataset, RandomTissuePatchDataset
from custom.networks.decoder import Decoder, load_taming_autoencoder, vq_autoencoder
from custom.networks.presets import tiny_tokenizer
from custom.networks.quantizer import perplexity
from custom.networks.taming import load_taming_checkpoint
from custom.networks.tokenizer import VQTokenizer
from custom.tokenizer_training import save_tokenizer

SEED = 0
MEASURE_PATCHES = 32
MEASURE_PX = 512
LEVEL = 1
PROBE_BATCH = 8
PROBE_PX = 256
PROBE_LR = 1e-3
KMEANS_PATCHES = 16


def images(items, count, size, seed, fixed=True, foreground_ratio=0.5):
    if fixed:
        ds = FixedTissuePatchDataset(
            items,
            patch_size=size,
            patch_level=LEVEL,
            count=count,
            foreground_ratio=foreground_ratio,
            seed=seed,
        )
        batch = [ds[i]["image"] for i in range(len(ds))]
    else:
        ds = RandomTissuePatchDataset(
            items, patch_size=size, patch_level=LEVEL, samples_per_epoch=count, seed=seed
        )
        batch = [s["image"] for s in ds]
    return torch.stack([b.as_tensor() for b in batch]).float() / 255.0


def psnr(a, b):
    mse = ((a - b) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1.0 / mse)).mean())


@torch.no_grad()
def usage(tokenizer, x):
    tokenizer.eval()
    indices = torch.cat([tokenizer(x[i : i + 4] * 2 - 1).indices.flatten() for i in range(0, len(x), 4)])
    counts = torch.bincount(indices, minlength=tokenizer.quantize.num_codes).float()
    return float(perplexity(counts)), int((counts > 0).sum())


def probe_psnr(tokenizer, train_items, held_out, steps, seed):
    """Train a fresh decoder on the frozen tokenizer's quantized tokens; PSNR on the held-out patches."""
    torch.manual_seed(seed)
    tokenizer.eval().requires_grad_(False)
    post = torch.nn.Conv2d(tokenizer.cfg.code_dim, tokenizer.cfg.vqgan.z_channels, 1)
    decoder = Decoder(tokenizer.cfg.vqgan, out_channels=3)
    opt = torch.optim.Adam([*post.parameters(), *decoder.parameters()], lr=PROBE_LR, betas=(0.5, 0.9))
    stream = RandomTissuePatchDataset(
        train_items,
        patch_size=PROBE_PX,
        patch_level=LEVEL,
        samples_per_epoch=steps * PROBE_BATCH,
        seed=seed + 1,
    )
    patches = [s["image"].as_tensor().float() / 255.0 for s in stream]
    for step in range(steps):
        x = torch.stack(patches[step * PROBE_BATCH : (step + 1) * PROBE_BATCH])
        with torch.no_grad():
            tokens = tokenizer(x * 2 - 1).tokens
        recon = (decoder(post(tokens)) + 1) / 2
        loss = (recon - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    decoder.eval()
    with torch.no_grad():
        outs = []
        for i in range(0, len(held_out), 4):
            x = held_out[i : i + 4]
            tokens = tokenizer(x * 2 - 1).tokens
            # decode window by window, as the tokenizer encoded
            t = tokens
            w = tokenizer.window_px // tokenizer.token_stride
            r, c = t.shape[-2] // w, t.shape[-1] // w
            win = t.unflatten(2, (r, w)).unflatten(4, (c, w)).permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
            pix = (decoder(post(win)) + 1) / 2
            pix = pix.unflatten(0, (x.shape[0], r, c)).permute(0, 3, 1, 4, 2, 5).flatten(4, 5).flatten(2, 3)
            outs.append(pix.clamp(0, 1))
    return psnr(torch.cat(outs), held_out)


def tokenizer_from_seg(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    tok = VQTokenizer(tiny_tokenizer())
    tok.load_state_dict(
        {k.removeprefix("tokenizer."): v for k, v in state["network"].items() if k.startswith("tokenizer.")}
    )
    return tok


def train_bundle(configs, slides, run_dir, seed, epochs, **overrides):
    """The bundle's train workflow of `configs` on the slides folder, run into `run_dir`."""
    flow = workflow(
        configs,
        "train",
        dataset_dir=slides,
        output_dir=str(run_dir),
        seed=seed,
        max_epochs=epochs,
        **overrides,
    )
    flow.run()
    return flow


def segmentation_arms(out):
    """The three segmentation arms, name: (tokenizer_checkpoint, freeze_tokenizer), tokenizers in `out`."""
    return {
        "random, frozen": (str(out / "random_tokenizer.pt"), True),
        "pathology-trained, frozen": (str(out / "pathology_tokenizer" / "tokenizer.pt"), True),
        "trainable (random init)": (None, False),
    }


def train_arm(slides, run_dir, seed, epochs, ckpt, freeze):
    """One segmentation arm trained (train.json + tiny.json) into `run_dir`: its Dice, steps and seconds."""
    t = time.perf_counter()
    flow = train_bundle(
        ["train", "tiny"], slides, run_dir, seed, epochs, tokenizer_checkpoint=ckpt, freeze_tokenizer=freeze
    )
    evaluator = flow.parser.get_parsed_content("validate#evaluator")
    return {
        "best_dice": float(evaluator.state.best_metric),
        "last_dice": float(evaluator.state.metrics["val_mean_dice"]),
        "steps": int(flow.parser.get_parsed_content("train#trainer").state.iteration),
        "seg_s": time.perf_counter() - t,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", required=True)
    ap.add_argument("--held_out", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seg_epochs", type=int, default=6)
    ap.add_argument("--tokenizer_epochs", type=int, default=6)
    ap.add_argument("--probe_steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    split = split_by_slide(load_items(args.slides, ""), 0.2, SEED)
    held_out = images(load_items(args.held_out, ""), MEASURE_PATCHES, MEASURE_PX, SEED)

    # 1. pathology tokenizer
    t = time.perf_counter()
    tok_dir = out / "pathology_tokenizer"
    if not (tok_dir / "vqgan.pt").exists():
        train_bundle(
            ["train_tokenizer", "train_tokenizer_tiny"], args.slides, tok_dir, SEED, args.tokenizer_epochs
        )
    timings["tokenizer_training_s"] = time.perf_counter() - t

    # 2. random tokenizer, codebook k-means'd on its own outputs
    torch.manual_seed(SEED)
    random_tok = VQTokenizer(tiny_tokenizer())
    raw_perplexity, raw_used = usage(random_tok, held_out)
    with torch.no_grad():
        x = images(split["training"], KMEANS_PATCHES, MEASURE_PX, SEED + 2, fixed=False)
        vectors = random_tok.encode(x * 2 - 1)
        random_tok.quantize.init_codebook(vectors.permute(0, 2, 3, 1).reshape(-1, vectors.shape[1]))
    save_tokenizer(out / "random_tokenizer.pt", random_tok)

    # 3. three segmentation runs
    arms = segmentation_arms(out)
    results = {}
    for name, (ckpt, freeze) in arms.items():
        run_dir = out / ("seg_" + name.split(",")[0].split(" ")[0])
        results[name] = train_arm(args.slides, run_dir, SEED, args.seg_epochs, ckpt, freeze)
        results[name]["run_dir"] = str(run_dir)
        print(name, results[name], flush=True)

    # 4. measurements on held-out patches
    for name in arms:
        tok = tokenizer_from_seg(Path(results[name]["run_dir"]) / "final.pt")
        results[name]["perplexity"], results[name]["used_codes"] = usage(tok, held_out)
        t = time.perf_counter()
        results[name]["probe_psnr"] = probe_psnr(tok, split["training"], held_out, args.probe_steps, SEED)
        results[name]["probe_s"] = time.perf_counter() - t
    vqgan = vq_autoencoder("tiny")
    load_taming_autoencoder(vqgan, tok_dir / "vqgan.pt")
    vqgan.eval()
    with torch.no_grad():
        recon = torch.cat([vqgan(held_out[i : i + 4]) for i in range(0, len(held_out), 4)])
    results["pathology-trained, frozen"]["own_decoder_psnr"] = psnr(recon, held_out)
    # sanity: the frozen pathology tokenizer in the seg net is bit-identical to the trained one
    check = VQTokenizer(tiny_tokenizer())
    load_taming_checkpoint(check, tok_dir / "tokenizer.pt")
    seg_tok = tokenizer_from_seg(Path(results["pathology-trained, frozen"]["run_dir"]) / "final.pt")
    identical = all(
        torch.equal(check.state_dict()[k], v)
        for k, v in seg_tok.state_dict().items()
        if k in check.state_dict() and k != "quantize.initialized"
    )

    summary = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "raw_random_codebook": {"perplexity": raw_perplexity, "used_codes": raw_used},
        "frozen_pathology_tokenizer_unchanged": identical,
        "timings": timings,
        "results": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print()
    print(
        "| tokenizer | reconstruction PSNR, own decoder (dB) | PSNR, decoder probe (dB) | codebook perplexity (used codes of 256) | val Dice, best (last) |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        own = f"{r['own_decoder_psnr']:.2f}" if "own_decoder_psnr" in r else "n/a (no decoder)"
        print(
            f"| {name} | {own} | {r['probe_psnr']:.2f} | {r['perplexity']:.1f} ({r['used_codes']}) | {r['best_dice']:.4f} ({r['last_dice']:.4f}) |"
        )


if __name__ == "__main__":
    main()
