"""Every baseline/ablation override resolves on train.json + tiny.json (and inference.json + tiny.json)
and builds the network or sampler its row names, without touching any slide."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from custom.data.patches import TilePatchDataset
from custom.networks import HoloHistoNet, SwinUNETRBaseline, UNetBaseline

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "holohisto_bundle"
CONFIGS = BUNDLE / "configs"

# override -> (network class, token_path, attention, training patch side)
NETWORK_ROWS = {
    "ablation_tokens_only.json": (HoloHistoNet, "tokenizer", "linear", 512),
    "ablation_linear_only.json": (HoloHistoNet, "linear", "linear", 512),
    "baseline_unet.json": (UNetBaseline, None, None, 1024),
    "baseline_swinunetr.json": (SwinUNETRBaseline, None, None, 1024),
    "ablation_linear_projection.json": (HoloHistoNet, "linear", "linear", 512),
    "ablation_no_tokens.json": (HoloHistoNet, "none", "linear", 512),
    "ablation_softmax_attention.json": (HoloHistoNet, "tokenizer", "softmax", 512),
    "ablation_tile_sampler.json": (HoloHistoNet, "tokenizer", "linear", 512),
    "ablation_patch_512.json": (HoloHistoNet, "tokenizer", "linear", 512),
    "ablation_patch_1024.json": (HoloHistoNet, "tokenizer", "linear", 1024),
    "ablation_patch_2048.json": (HoloHistoNet, "tokenizer", "linear", 2048),
    "ablation_patch_4096.json": (HoloHistoNet, "tokenizer", "linear", 4096),
    "context_orientation.json": (HoloHistoNet, "tokenizer", "linear", 512),
}
# The rows whose head sees no encoder skips (benchmarks/context.py's tokens_only and linear_only).
SKIPLESS = {"ablation_tokens_only.json", "ablation_linear_only.json"}


def parser_for(base: str, override: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / base), str(CONFIGS / "tiny.json"), str(CONFIGS / override)])
    parser["bundle_root"] = str(BUNDLE)
    return parser


@pytest.mark.parametrize("override", sorted(NETWORK_ROWS))
def test_ablation_override_builds_its_network_on_the_tiny_training_config(override):
    cls, token_path, attention, side = NETWORK_ROWS[override]
    parser = parser_for("train.json", override)
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, cls)
    if cls is HoloHistoNet:
        assert (network.token_path, network.config["attention"]) == (token_path, attention)
        assert network.config["vit_widths"] == [48, 64]  # still the tiny preset
        assert network.skip_strides == ([] if override in SKIPLESS else [2, 4, 8])
        assert all(step.skip_proj is None for step in network.head.steps) == (override in SKIPLESS)
        # Only the orientation row has the fixed context branch, and its head takes the maps.
        has_context = override == "context_orientation.json"
        assert (network.context is not None) == (network.head.context_proj is not None) == has_context
    assert parser.get_parsed_content("patch_size") == [side, side]
    assert parser.get_parsed_content("patch_mpp") == 0.5  # the tiny preset reads 0.5 um/px (20X)


@pytest.mark.parametrize("override", sorted(set(NETWORK_ROWS) - {"ablation_tile_sampler.json"}))
def test_ablation_override_layers_on_the_inference_config(override):
    cls, _, _, side = NETWORK_ROWS[override]
    parser = parser_for("inference.json", override)
    parser["ckpt_path"] = ""  # no checkpoint: the network comes from the config
    assert isinstance(parser.get_parsed_content("network_def"), cls)
    assert parser.get_parsed_content("patch_size") == [side, side]
    # every row stitches seam-free with the default's 128 px: a margin in pixels, since all rows tokenise at 16 px
    assert parser.get_parsed_content("overlap") == 128 < side


def test_tile_sampler_override_swaps_in_the_grid_sampler_with_a_shuffling_loader():
    parser = parser_for("train.json", "ablation_tile_sampler.json")
    dataset = parser["train#dataset"]
    assert dataset["_target_"] == "custom.data.patches.TilePatchDataset"
    kwargs = {k: v for k, v in dataset.items() if not k.startswith("_")}
    inspect.signature(TilePatchDataset).bind(**kwargs)  # every argument is one the sampler takes
    assert parser["train#dataloader#shuffle"] is True
