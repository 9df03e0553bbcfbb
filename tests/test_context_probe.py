"""benchmarks/context_probe.py: the probed features are the net's own, pooled over the field, and the probe reads a known tell."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from custom.networks import holohisto_tiny

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import context_probe  # noqa: E402
import decoy_probability  # noqa: E402


def test_stage_features_are_those_the_net_computes():
    torch.manual_seed(0)
    net = holohisto_tiny().eval()
    x = torch.rand(1, 3, 512, 512)
    probed = context_probe.stage_features(net, x)
    with torch.inference_mode():
        own = net.forward_features(x)
        tokenized = net.tokenizer(x * 2 - 1, net.skip_strides)
        pre_quant = net.tokenizer.encode(x * 2 - 1)
    assert set(own) < set(probed) and {"pre_quant", "tokens"} < set(probed)
    for name, fmap in own.items():
        assert torch.allclose(probed[name], fmap, atol=1e-5), name
    assert torch.allclose(probed["tokens"], tokenized.tokens, atol=1e-5)
    assert torch.allclose(probed["pre_quant"], pre_quant, atol=1e-5)
    assert not torch.allclose(probed["pre_quant"], probed["tokens"])  # the codebook sits between them
    # the quantizer is left as it was: the net still runs as before
    with torch.inference_mode():
        assert torch.allclose(net.forward_features(x)["stage0"], own["stage0"])


def test_pool_takes_mean_and_sd_over_the_field_at_each_stride():
    fmap = torch.zeros(1, 2, 4, 4)
    fmap[0, 0, :, :2] = 1.0  # channel 0: 1 on the left half, 0 on the right
    fmap[0, 1] = torch.arange(16.0).view(4, 4)
    field = np.zeros((8, 8), bool)
    field[:, 4:] = True  # the right half, at twice the map's resolution
    pooled = context_probe.pool({"m": fmap}, field)["m"]
    right = torch.tensor([2.0, 3, 6, 7, 10, 11, 14, 15])
    assert np.allclose(pooled[:4], [0.0, right.mean(), 0.0, right.std()])
    assert pooled[4] == 0.0 and pooled[5] > 0  # channel 0 never drifts across the field; channel 1 does


def test_block_spread_sees_drift_across_the_field_not_fine_texture():
    fine = torch.zeros(1, 1, 64, 64)
    fine[0, 0, ::2, ::2] = 1.0  # a texture repeating every 2 px: the same in every block
    drift = torch.linspace(0, 1, 64).repeat(64, 1)[None, None]  # one slow ramp across the field
    field = np.ones((64, 64), bool)
    texture = context_probe.pool({"m": fine}, field)["m"]
    ramp = context_probe.pool({"m": drift}, field)["m"]
    assert texture[1] > 0.4 and abs(texture[2]) < 1e-6  # spread over pixels, none across blocks
    assert ramp[2] > 0.25 and abs(ramp[2] - ramp[1]) < 0.05


def test_the_probe_finds_a_tell_in_the_spread_and_none_without_one():
    rng = np.random.default_rng(0)

    def objects(n, slide, tell):
        decoy = rng.random(n) < 0.3
        spread = np.where(decoy & tell, 0.5, 1.0)[:, None]  # decoys' fields vary less, as their tubules do
        feats = np.hstack([rng.normal(0, 1, (n, 6)), spread * rng.gamma(4, 0.25, (n, 6))])
        return [
            {"slide": slide, "decoy": bool(d), "features": {"net": {"s": list(f)}}}
            for d, f in zip(decoy, feats, strict=True)
        ]

    for tell, low, high in ((True, 0.85, 1.0), (False, 0.25, 0.75)):
        pooled = {
            "train": objects(60, "a", tell) + objects(60, "b", tell) + objects(60, "c", tell),
            "test": objects(80, "d", tell),
        }
        result = context_probe.probe(pooled, "net", "s")
        assert low <= result["test_auc"] <= high, (tell, result)
        assert result["shrinkage"] in context_probe.SHRINKAGE and result["dims"] == 12
        assert context_probe.probe(pooled, "net", "s", "block spread")["dims"] == 4


def _biased(num_classes: int, favoured: int) -> torch.nn.Module:
    """A tiny net whose logits favour one class at every pixel, whatever the input."""
    net = holohisto_tiny(num_classes=num_classes).eval()
    conv = net.head.to_logits[0]  # then PixelShuffle(2): class c is channels 4c..4c+3
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.bias[4 * favoured : 4 * favoured + 4] = 10.0
    return net


def test_the_decoy_score_is_p_background_for_two_classes_and_the_mimic_share_for_three():
    rgb = np.full((256, 256, 3), 200, np.uint8)
    scores = {
        (classes, favoured): float(decoy_probability._decoy_share(_biased(classes, favoured), rgb).mean())
        for classes, favoured in ((2, 0), (2, 1), (3, 1), (3, 2))
    }
    assert scores[(2, 0)] > 0.999 and scores[(2, 1)] < 0.001  # P(background)
    assert scores[(3, 2)] > 0.999 and scores[(3, 1)] < 0.001  # P(mimic) / (P(mimic) + P(glomerulus))
