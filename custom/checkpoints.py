"""Checkpoints that rebuild their own network: weights plus the exact network configuration.

Format: a dict with "network" (state dict) and "network_config" (the constructor record from
`custom.networks.network_config`); MONAI's CheckpointSaver writes the same keys (plus optimizer,
scheduler and trainer state when training saves them). Every load is `weights_only=True`: a
checkpoint is data, never code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from custom.errors import ConfigError
from custom.io import atomic_write, unwrap

NETWORK_KEY = "network"
CONFIG_KEY = "network_config"


def read_checkpoint(path: str | Path | dict) -> dict:
    """A checkpoint dict, read weights-only (a dict given is returned as it is, already read)."""
    if isinstance(path, dict):
        return path
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-checkpoint files
        if "Weights only load failed" in str(err):
            raise ConfigError(
                f"{path}: refused: it holds pickled Python objects besides tensors, and loading those can run "
                "code; use a weights-only checkpoint from a source you trust"
            ) from err
        detail = " ".join(str(err).split())
        raise ConfigError(f"{path}: not a readable checkpoint ({type(err).__name__}: {detail})") from err
    if not isinstance(ckpt, dict):
        raise ConfigError(f"{path}: expected a dict checkpoint, found {type(ckpt).__name__}")
    return ckpt


def read_if_present(path: str | Path | None) -> dict:
    """The checkpoint at `path`, or {} when there is none (a config can then fall back to its defaults)."""
    return read_checkpoint(path) if path and Path(path).is_file() else {}


def config_from_checkpoint(path: str | Path | dict | None, fallback: dict | None = None) -> dict:
    """The network configuration recorded in a checkpoint (a path or a read dict), else `fallback`."""
    ckpt = path if isinstance(path, dict) else read_if_present(path)
    if ckpt:
        config = ckpt.get(CONFIG_KEY)
        if isinstance(config, dict):
            return config
    if fallback is None:
        raise ConfigError(
            f"{path}: the checkpoint records no network configuration and no fallback was given"
        )
    return dict(fallback)


def load_weights(network: nn.Module, path: str | Path, checkpoint: dict | None = None) -> nn.Module:
    """Load the network weights of the checkpoint at `path` strictly; a mismatch names the keys.

    `checkpoint` is that file already read (a config reads it once for everything it needs).
    """
    ckpt = checkpoint or read_checkpoint(path)
    state = ckpt.get(NETWORK_KEY, ckpt)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: has no '{NETWORK_KEY}' state dict (keys: {sorted(ckpt)[:8]})")
    target = unwrap(network)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = target.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {name} (e.g. {', '.join(keys[:3])})")
        raise ConfigError(f"{path}: checkpoint does not match the network: {'; '.join(parts)}")
    target.load_state_dict(state, strict=True)
    return network


def save_checkpoint(path: str | Path, network: nn.Module, config: dict, **extra) -> Path:
    """Write {"network", "network_config", **extra} atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    target = unwrap(network)
    with atomic_write(path) as tmp:
        torch.save({NETWORK_KEY: target.state_dict(), CONFIG_KEY: dict(config), **extra}, tmp)
    return path
