"""Building networks by name (segment-anything's build_sam.py): presets, the registry, and records.

`holohisto_full()`, `holohisto_fast()` and `holohisto_tiny()` build a preset (presets.py) with optional
overrides; `build_network(config)` builds any network from a config dict (a preset plus overrides, or
the `network_config` record a checkpoint stores) and `network_config(model)` writes that record from
the config the model was built from.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from custom.errors import ConfigError
from custom.networks.baselines import SwinUNETRBaseline, UNetBaseline
from custom.networks.config import HoloHistoConfig
from custom.networks.holohisto import HoloHistoNet
from custom.networks.presets import PRESETS

# A HoloHisto record without a preset is read over the full size (train.json's network is one).
DEFAULT_PRESET = "full"

NETWORKS: dict[str, type[nn.Module]] = {
    HoloHistoNet.network_name: HoloHistoNet,
    UNetBaseline.network_name: UNetBaseline,
    SwinUNETRBaseline.network_name: SwinUNETRBaseline,
}


def _create(cfg: HoloHistoConfig, load_tokenizer_checkpoint: bool = True) -> HoloHistoNet:
    model = HoloHistoNet(cfg)
    if load_tokenizer_checkpoint and model.tokenizer_checkpoint:
        model.load_tokenizer(model.tokenizer_checkpoint)
    return model


def holohisto_full(**overrides: Any) -> HoloHistoNet:
    """The paper's size (taming f16/1024 tokenizer, EfficientViT-B2-class ViT); meant for a GPU."""
    return _create(PRESETS["full"]().updated(overrides))


def holohisto_fast(**overrides: Any) -> HoloHistoNet:
    """The full net with its tokenizer's first downsampling folded into conv_in (no taming checkpoint)."""
    return _create(PRESETS["fast"]().updated(overrides))


def holohisto_tiny(**overrides: Any) -> HoloHistoNet:
    """CPU-sized net (0.58 M parameters): trains on 2 cores; cannot load a taming checkpoint."""
    return _create(PRESETS["tiny"]().updated(overrides))


def network_config(model: nn.Module) -> dict[str, Any]:
    """JSON-serialisable record of what the model was built from ({"name": ..., **settings})."""
    name = getattr(model, "network_name", None)
    if name not in NETWORKS:
        raise ConfigError(f"{type(model).__name__} is not a network build_network knows ({sorted(NETWORKS)})")
    return {"name": name, **copy.deepcopy(model.config)}


def build_network(
    config: dict[str, Any], load_tokenizer_checkpoint: bool = True, grad_checkpointing: bool = False
) -> nn.Module:
    """Build a net from a config: `network_config` output (as stored in checkpoints), or for HoloHisto a
    `preset` ("full" | "fast" | "tiny") plus overrides, e.g. {"name": "holohisto", "preset": "tiny",
    "num_classes": 3}.

    A HoloHisto `tokenizer_checkpoint` in the config is loaded unless load_tokenizer_checkpoint=False,
    which is what restoring a full checkpoint wants (its state dict replaces those weights anyway).
    `grad_checkpointing` calls the net's `set_grad_checkpointing` (train.json sets it for the full size).
    """
    args = dict(config)
    name = args.pop("name", HoloHistoNet.network_name)
    if name not in NETWORKS:
        raise ConfigError(f"unknown network {name!r}; expected one of {sorted(NETWORKS)}")
    if name != HoloHistoNet.network_name:
        try:
            model = NETWORKS[name](**args)
        except TypeError as err:
            raise ConfigError(f"network {name!r}: {err}") from err
    else:
        preset = args.pop("preset", None) or DEFAULT_PRESET
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
        model = _create(PRESETS[preset]().updated(args), load_tokenizer_checkpoint)
    if grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(
                f"network {name!r} has no gradient checkpointing; set grad_checkpointing to False for it"
            )
        model.set_grad_checkpointing(True)
    return model
