"""Network numbers in one place: configs, presets and the records checkpoints keep, old and new."""

from __future__ import annotations

import json

import pytest
import torch

from custom.errors import ConfigError
from custom.networks import (
    PRESETS,
    TOKENIZER_PRESETS,
    HoloHistoConfig,
    SwinUNETRBaseline,
    TokenizerConfig,
    UNetBaseline,
    build_network,
    holohisto_fast,
    holohisto_full,
    holohisto_tiny,
    load_taming_checkpoint,
    network_config,
)
from custom.networks.decoder import vq_autoencoder

# The network_config a checkpoint of the tiny net held before the configs were dataclasses (written by
# the code at commit eeb4712): the tokenizer's settings merged over the full tokenizer's, so it carries
# checkpoint_windows, a memory switch that is now set_grad_checkpointing().
RECORD_BEFORE_CONFIGS = {
    "name": "holohisto",
    "in_chans": 3,
    "num_classes": 2,
    "token_path": "tokenizer",
    "attention": "linear",
    "tokenizer": {
        "ch": 16,
        "ch_mult": [1, 2, 2, 4],
        "num_res_blocks": 1,
        "attn_resolutions": [16],
        "resolution": 256,
        "z_channels": 64,
        "num_codes": 256,
        "code_dim": 32,
        "beta": 0.25,
        "stem_stride": 2,
        "norm_groups": 8,
        "kmeans_init": True,
        "restart_every": 20,
        "window_batch": 16,
        "checkpoint_windows": True,
    },
    "freeze_tokenizer": False,
    "tokenizer_checkpoint": None,
    "skip_strides": [2, 4, 8],
    "vit_widths": [48, 64],
    "vit_depths": [1, 2],
    "head_dim": 16,
    "expand_ratio": 4,
    "aggregation_scales": [5],
    "head_width": 32,
    "head_depth": 1,
    "decoder_widths": [32, 16, 16],
    "head_tile_px": 1024,
}


def test_a_record_written_before_the_config_classes_builds_the_same_net():
    rebuilt = build_network(json.loads(json.dumps(RECORD_BEFORE_CONFIGS)))
    rebuilt.load_state_dict(holohisto_tiny().state_dict(), strict=True)
    expected = {**RECORD_BEFORE_CONFIGS, "tokenizer": dict(RECORD_BEFORE_CONFIGS["tokenizer"])}
    del expected["tokenizer"]["checkpoint_windows"]
    expected["context_branch"] = "none"  # a setting added since: the old record reads as without it
    assert network_config(rebuilt) == expected == network_config(holohisto_tiny())


def test_the_record_is_the_config_the_net_was_built_from():
    model = holohisto_tiny(num_classes=3, tokenizer={"num_codes": 128})
    assert isinstance(model.cfg, HoloHistoConfig) and isinstance(model.tokenizer.cfg, TokenizerConfig)
    record = network_config(model)
    assert record == {"name": "holohisto", **model.cfg.to_dict()}
    assert record["tokenizer"]["num_codes"] == 128 == model.tokenizer.quantize.num_codes
    assert model.head.to_logits[0].out_channels == 3 * 4  # the record's num_classes is what was built
    # The tokenizer's own record (tokenizer.pt) is its part of the same config, plus its input channels.
    assert model.tokenizer.config == {**record["tokenizer"], "in_channels": 3}


def test_presets_are_builder_functions_in_one_registry():
    assert sorted(PRESETS) == sorted(TOKENIZER_PRESETS) == ["fast", "full", "tiny"]
    for name, builder in PRESETS.items():
        assert builder() == builder() and builder() is not builder()  # a fresh config on every call
        assert builder().tokenizer == TOKENIZER_PRESETS[name]()
    with torch.device("meta"):
        built = {"full": holohisto_full(), "fast": holohisto_fast(), "tiny": holohisto_tiny()}
    for name, model in built.items():
        assert network_config(model) == {"name": "holohisto", **PRESETS[name]().to_dict()}
        assert network_config(build_network({"name": "holohisto", "preset": name})) == network_config(model)
    # No preset reads as the full size, as train.json's network does.
    assert network_config(build_network({"name": "holohisto"})) == network_config(built["full"])


def test_the_fast_tokenizer_is_the_full_one_without_its_full_resolution_level():
    with torch.device("meta"):
        full, fast = holohisto_full(), holohisto_fast()
    assert fast.tokenizer.encoder.level_strides == full.tokenizer.encoder.level_strides[1:]
    assert fast.tokenizer.token_stride == full.tokenizer.token_stride == 16
    assert fast.head.steps[-1].skip_proj.conv.in_channels == full.head.steps[-1].skip_proj.conv.in_channels
    # Everything after the tokenizer is the full net's, weight for weight.
    rest = [
        {k: v.shape for k, v in m.state_dict().items() if not k.startswith("tokenizer.")}
        for m in (full, fast)
    ]
    assert rest[0] == rest[1] and len(rest[0]) > 100
    assert fast.tokenizer.encoder.conv_in.stride == (2, 2) and full.tokenizer.encoder.conv_in.stride == (1, 1)


def test_the_fast_tokenizer_refuses_a_taming_checkpoint(tmp_path, fixtures_dir):
    shapes = json.loads((fixtures_dir / "taming_vqgan_f16_1024_encoder_keys.json").read_text())["keys"]
    torch.save({k: torch.zeros(v) for k, v in shapes.items()}, tmp_path / "vqgan.pt")
    with pytest.raises(
        ConfigError,
        match=r"vqgan\.pt: checkpoint does not fit .*unexpected keys: .*encoder\.down\.4.*holohisto_full",
    ):
        load_taming_checkpoint(holohisto_fast(), tmp_path / "vqgan.pt")


@pytest.mark.parametrize(
    "config, named",
    [
        ({"name": "holohisto", "preset": "tiny", "depth": 3}, "depth"),
        ({"name": "holohisto", "preset": "tiny", "tokenizer": {"chanels": 8}}, "chanels"),
        (
            {"name": "holohisto", "preset": "tiny", "tokenizer": {"checkpoint_window": True}},
            "checkpoint_window",
        ),
    ],
    ids=["net", "tokenizer", "near_miss_of_a_retired_key"],
)
def test_an_unknown_setting_is_a_config_error_that_names_it(config, named):
    with pytest.raises(ConfigError, match=rf"unknown setting\(s\) \['{named}'\]"):
        build_network(config)


def test_a_context_branch_is_one_the_net_knows_and_needs_the_token_grid():
    assert holohisto_tiny(context_branch="orientation").context.out_channels == 5
    with pytest.raises(ValueError, match="context_branch must be one of"):
        holohisto_tiny(context_branch="sobel")
    with pytest.raises(ValueError, match="token_path='none' has not"):
        holohisto_tiny(context_branch="orientation", token_path="none")


def test_the_autoencoder_mirrors_its_tokenizer_and_records_what_it_built():
    model = vq_autoencoder("tiny", tokenizer={"ch": 8}, decoder={"num_res_blocks": 2})
    assert model.tokenizer.cfg.vqgan.ch == model.decoder.cfg.ch == 8
    assert model.decoder_config == {
        "out_channels": 3,
        **{k: v for k, v in model.tokenizer.cfg.vqgan.to_dict().items() if k != "in_channels"},
        "num_res_blocks": 2,
    }
    assert len(model.decoder.up[0].block) == 3  # taming's num_res_blocks + 1
    with pytest.raises(ConfigError, match=r"decoder: unknown setting\(s\) \['widht'\]"):
        vq_autoencoder("tiny", decoder={"widht": 3})


def test_build_network_turns_gradient_checkpointing_on_or_says_it_cannot():
    assert build_network({"name": "holohisto", "preset": "tiny"}, grad_checkpointing=True).grad_checkpointing
    swin = build_network({"name": "swin_unetr", "feature_size": 12}, grad_checkpointing=True)
    assert isinstance(swin, SwinUNETRBaseline)
    assert all(m.use_checkpoint for m in swin.net.modules() if hasattr(m, "use_checkpoint"))
    assert isinstance(build_network({"name": "unet"}), UNetBaseline)
    with pytest.raises(ConfigError, match="'unet' has no gradient checkpointing"):
        build_network({"name": "unet"}, grad_checkpointing=True)
