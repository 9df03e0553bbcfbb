"""Loading taming-transformers VQModel checkpoints into the tokenizer, and the mismatch report loaders share."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from custom.errors import ConfigError
from custom.networks.tokenizer import VQTokenizer

# How many offending keys an error message lists before it only counts the rest.
LISTED_KEYS = 8


def _taming_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries a tokenizer takes from a taming VQModel (decoder, discriminator etc. are dropped)."""
    return {
        k: v
        for k, v in state.items()
        if k.startswith(("encoder.", "quant_conv.")) or k == "quantize.embedding.weight"
    }


def state_dict_mismatch(
    given: dict, expected: dict, owner: str, optional: frozenset[str] = frozenset()
) -> str:
    """What keeps `given` from loading strictly into a module whose state is `expected` ("" if nothing).

    Names the missing and unexpected keys and the shape mismatches (checkpoint vs `owner`).
    """
    missing = sorted(expected.keys() - given.keys() - optional)
    unexpected = sorted(given.keys() - expected.keys())
    mismatched = sorted(
        f"{k} (checkpoint {list(given[k].shape)}, {owner} {list(expected[k].shape)})"
        for k in expected.keys() & given.keys()
        if given[k].shape != expected[k].shape
    )
    problems = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    return "; ".join(f"{label}: {_listed(keys)}" for label, keys in problems if keys)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:LISTED_KEYS])
    return shown + (f" and {len(keys) - LISTED_KEYS} more" if len(keys) > LISTED_KEYS else "")


def read_state_dict(path: str | Path, kind: str) -> dict:
    """The state dict of a weights-only torch checkpoint file: a bare one, or a `.ckpt` dict's `state_dict`.

    `kind` names the checkpoint in the error when the file is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {kind} checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises many types; all mean "not a weights file we can read"
        raise ConfigError(f"{path}: cannot be read as a weights-only torch checkpoint ({err})") from err
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ConfigError(
            f"{path}: expected a state dict or a dict with 'state_dict', got {type(checkpoint).__name__}"
        )
    return checkpoint


def load_taming_checkpoint(module: nn.Module, path: str | Path) -> None:
    """Load a taming-transformers VQModel checkpoint into a `VQTokenizer` (or a net holding `.tokenizer`).

    Accepts a `.ckpt` dict with a `state_dict` or a bare state dict, read with weights_only=True. Keeps
    encoder.*, quant_conv.* and quantize.embedding.weight; every one of those the tokenizer has must be
    present with the same shape, and none may be extra. Raises ConfigError naming what does not fit.
    """
    tokenizer = getattr(module, "tokenizer", module)
    if not isinstance(tokenizer, VQTokenizer):
        raise ConfigError(f"{type(module).__name__} has no VQ tokenizer to load {path} into")
    given = _taming_keys(read_state_dict(path, "tokenizer"))
    problems = state_dict_mismatch(given, _taming_keys(tokenizer.state_dict()), "tokenizer")
    if problems:
        raise ConfigError(
            f"{path}: checkpoint does not fit this tokenizer ({problems}). The tokenizer was built "
            f"with {tokenizer.config}; a taming f16/1024 checkpoint needs the full-size tokenizer "
            "(holohisto_full: ch 128, ch_mult (1, 1, 2, 2, 4), stem_stride 1, 1024 codes x 256)."
        )
    tokenizer.load_state_dict(given, strict=False)
    tokenizer.quantize.initialized.fill_(True)
