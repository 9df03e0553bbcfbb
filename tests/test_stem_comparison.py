"""benchmarks/stem_comparison.py: the two arms differ only in the stem, and the held-out Dice is scored right."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from custom.checkpoints import save_checkpoint
from custom.data.datalists import load_items
from custom.data.patches import FixedTissuePatchDataset
from custom.networks import build_network, network_config
from custom.synth import write_synthetic_slides

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import stem_comparison  # noqa: E402


def _gflops(tokenizer: dict, side: int = 512) -> float:
    with torch.device("meta"):
        net = build_network(stem_comparison.network_config(tokenizer)).eval()
        images = torch.empty(1, 3, side, side)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(images)
    return counter.get_total_flops() / 1e9


def test_the_faithful_arm_adds_only_the_full_resolution_level():
    fast, faithful = (
        build_network(stem_comparison.network_config(arm)) for arm in stem_comparison.ARMS.values()
    )

    def outside_tokenizer(net):
        return {n: p.shape for n, p in net.named_parameters() if not n.startswith("tokenizer.")}

    assert outside_tokenizer(fast) == outside_tokenizer(faithful)  # the ViT and the head are the same
    assert len(faithful.tokenizer.encoder.down) == len(fast.tokenizer.encoder.down) + 1
    assert faithful.tokenizer.encoder.conv_in.stride == (1, 1) and fast.tokenizer.encoder.conv_in.stride == (
        2,
        2,
    )
    ratio = _gflops(stem_comparison.ARMS["faithful stem"]) / _gflops(
        stem_comparison.ARMS["fast stem (tiny preset)"]
    )
    assert 1.8 < ratio < 2.5  # RESULTS.md: 352 vs 167 GFLOPs per 4K patch


def _constant_checkpoint(path: Path, foreground: bool) -> Path:
    """A tiny net whose logits say one class at every pixel, whatever the input."""
    net = build_network(stem_comparison.network_config({}))
    conv = net.head.to_logits[0]  # then PixelShuffle(2): output class c is input channels 4c..4c+3
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.bias[4 if foreground else 0 : 8 if foreground else 4] = 10.0
    return save_checkpoint(path, net, network_config(net))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("held_out")
    list(write_synthetic_slides(folder, 1, 4096, 3072, seed=900, progress=False))
    return folder


def test_held_out_dice_of_nets_that_say_one_class_everywhere(held_out, tmp_path):
    patches = FixedTissuePatchDataset(
        load_items(str(held_out), ""),
        patch_size=stem_comparison.PATCH_PX,
        patch_level=stem_comparison.LEVEL,
        count=stem_comparison.SCORE_PATCHES,
        seed=7,
    )
    truth = [np.asarray(s["label"])[0] > 0 for s in patches]
    with_fg = [t for t in truth if t.any()]
    assert 0 < len(with_fg) < len(truth)  # some patches hold glomeruli, some do not

    everything = stem_comparison.held_out_dice(_constant_checkpoint(tmp_path / "fg.pt", True), held_out)
    assert everything["scored_patches"] == len(truth)  # every patch has a predicted foreground
    expected = [2 * t.sum() / (t.size + t.sum()) for t in truth]
    assert everything["held_out_mean_dice"] == pytest.approx(np.mean(expected))
    pooled = 2 * sum(t.sum() for t in truth) / sum(t.size + t.sum() for t in truth)
    assert everything["held_out_pooled_dice"] == pytest.approx(pooled)

    nothing = stem_comparison.held_out_dice(_constant_checkpoint(tmp_path / "bg.pt", False), held_out)
    assert nothing == {"held_out_mean_dice": 0.0, "held_out_pooled_dice": 0.0, "scored_patches": len(with_fg)}
