"""The numbers of the HoloHisto networks as taming-style configs: one object per part, shared, frozen.

`VQGANConfig` is taming-transformers' `ddconfig`: the numbers the VQGAN encoder and its mirror decoder
share (`Encoder(cfg)`, `Decoder(cfg)`). `TokenizerConfig` is a VQGAN config plus the codebook and the
window tiling; `HoloHistoConfig` a tokenizer config plus the ViT stages and the head. The named sizes are
builder functions in `presets.py`.

On disk (a checkpoint's "network_config", a tokenizer.pt's "tokenizer_config") a config is a flat JSON
dict: `to_dict` writes it from the config a model was built from, so the record is derived, never kept
by hand; `from_dict` reads it back, including records written before these classes existed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from custom.errors import ConfigError
from custom.networks.attention import ATTENTION_KERNELS

TOKEN_PATHS = ("tokenizer", "linear", "none")
CONTEXT_BRANCHES = ("none", "orientation")
STEM_STRIDES = (1, 2)
# Settings older records carry that are no longer part of a network's shape. checkpoint_windows was the
# tokenizer's memory switch; it is now `set_grad_checkpointing()`, which train.json sets.
RETIRED_TOKENIZER_KEYS = frozenset({"checkpoint_windows"})


def _json(value: Any) -> Any:
    return [_json(v) for v in value] if isinstance(value, (tuple, list)) else value


def _frozen(value: Any) -> Any:
    return tuple(_frozen(v) for v in value) if isinstance(value, (tuple, list)) else value


def _checked(
    values: dict[str, Any], known: set[str], owner: str, retired: frozenset[str] = frozenset()
) -> dict:
    """`values` restricted to `known` keys (lists as tuples); any other key but a retired one is an error."""
    unknown = sorted(set(values) - known - retired)
    if unknown:
        raise ConfigError(f"{owner}: unknown setting(s) {unknown}; known settings: {sorted(known)}")
    return {k: _frozen(v) for k, v in values.items() if k in known}


def _made(cls, owner: str, **values):
    try:
        return cls(**values)
    except TypeError as err:  # a required setting is absent: say which, in the config's terms
        raise ConfigError(f"{owner}: {str(err).split('.__init__() ')[-1]}") from err


def _names(cls) -> set[str]:
    return {f.name for f in fields(cls)}


def _json_fields(config) -> dict[str, Any]:
    return {f.name: _json(getattr(config, f.name)) for f in fields(config)}


@dataclass(frozen=True, kw_only=True)
class VQGANConfig:
    """taming's ddconfig (double_z=False), plus `stem_stride` and `norm_groups`.

    stem_stride 2 folds the first downsampling into conv_in, so no many-channel conv runs at full
    resolution; such an encoder no longer loads a taming checkpoint. norm_groups 32 is taming's.
    """

    in_channels: int = 3
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    z_channels: int
    stem_stride: int = 1
    norm_groups: int = 32

    def __post_init__(self):
        if self.stem_stride not in STEM_STRIDES:
            raise ValueError(
                f"stem_stride must be 1 (taming) or 2 (first downsampling folded in), got {self.stem_stride}"
            )
        if self.resolution % self.token_stride:
            raise ValueError(
                f"window {self.resolution} px is not a multiple of the token stride {self.token_stride}"
            )

    def to_dict(self) -> dict[str, Any]:
        return _json_fields(self)

    def updated(self, overrides: dict[str, Any], owner: str = "vqgan") -> VQGANConfig:
        return dataclasses.replace(self, **_checked(overrides, _names(VQGANConfig), owner))

    @property
    def level_strides(self) -> list[int]:
        """Stride of each encoder level's features (finest first); the last one is the token stride."""
        return [self.stem_stride * 2**i for i in range(len(self.ch_mult))]

    @property
    def level_channels(self) -> list[int]:
        return [self.ch * mult for mult in self.ch_mult]

    @property
    def token_stride(self) -> int:
        return self.level_strides[-1]


@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """A VQGAN encoder config plus the quantizer and the windowing.

    num_codes, code_dim: taming's n_embed, embed_dim. beta: commitment weight. kmeans_init,
    restart_every: codebook care while the tokenizer trains. window_batch: how many `resolution`-sized
    windows are encoded at a time, which bounds the encoder's working memory whatever the input size.
    """

    vqgan: VQGANConfig
    num_codes: int
    code_dim: int
    beta: float = 0.25
    kmeans_init: bool = False
    restart_every: int = 0
    window_batch: int = 16

    def to_dict(self) -> dict[str, Any]:
        """The flat record: the VQGAN's keys and the tokenizer's own, as taming-era records have them."""
        own = {f.name: _json(getattr(self, f.name)) for f in fields(self) if f.name != "vqgan"}
        return {**self.vqgan.to_dict(), **own}

    @classmethod
    def from_dict(cls, values: dict[str, Any], owner: str = "tokenizer") -> TokenizerConfig:
        vqgan_names = _names(VQGANConfig)
        own = _checked(values, vqgan_names | _names(cls) - {"vqgan"}, owner, RETIRED_TOKENIZER_KEYS)
        vqgan = {k: own.pop(k) for k in vqgan_names & own.keys()}
        return _made(cls, owner, vqgan=_made(VQGANConfig, owner, **vqgan), **own)

    def updated(self, overrides: dict[str, Any]) -> TokenizerConfig:
        """This config with some flat keys replaced, e.g. {"num_codes": 128, "ch": 32}."""
        return TokenizerConfig.from_dict({**self.to_dict(), **overrides})


@dataclass(frozen=True, kw_only=True)
class HoloHistoConfig:
    """Everything `HoloHistoNet` is built from; see that class for what each setting does.

    The sizes have no defaults: their numbers live in the presets (presets.py) and nowhere else.
    """

    in_chans: int = 3
    num_classes: int = 2
    token_path: str = "tokenizer"
    attention: str = "linear"
    tokenizer: TokenizerConfig
    freeze_tokenizer: bool = False
    tokenizer_checkpoint: str | None = None
    skip_strides: tuple[int, ...] = (2, 4, 8)
    vit_widths: tuple[int, ...]
    vit_depths: tuple[int, ...]
    head_dim: int
    expand_ratio: float = 4
    aggregation_scales: tuple[int, ...] = (5,)
    head_width: int
    head_depth: int
    decoder_widths: tuple[int, ...]
    head_tile_px: int = 1024
    context_branch: str = "none"

    def __post_init__(self):
        if self.token_path not in TOKEN_PATHS:
            raise ValueError(f"token_path must be one of {TOKEN_PATHS}, got {self.token_path!r}")
        if self.context_branch not in CONTEXT_BRANCHES:
            raise ValueError(f"context_branch must be one of {CONTEXT_BRANCHES}, got {self.context_branch!r}")
        if self.context_branch != "none" and self.token_path == "none":
            raise ValueError(
                "context_branch enters the head at the token grid, which token_path='none' has not"
            )
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.token_path == "none" and not self.skip_strides:
            raise ValueError("token_path='none' with no skip_strides leaves the head without any input")
        if len(self.vit_widths) != len(self.vit_depths):
            raise ValueError(
                f"vit_widths {list(self.vit_widths)} and vit_depths {list(self.vit_depths)} differ in length"
            )
        if not isinstance(self.freeze_tokenizer, bool):
            # a command-line "false" arrives as a (truthy) string: refuse it rather than freeze
            raise ConfigError(f"freeze_tokenizer must be true or false, got {self.freeze_tokenizer!r}")
        # The tokenizer reads the net's input channels; a checkpoint path is recorded as a string.
        normalised = {
            "tokenizer": dataclasses.replace(
                self.tokenizer, vqgan=dataclasses.replace(self.tokenizer.vqgan, in_channels=self.in_chans)
            ),
            "skip_strides": tuple(sorted(self.skip_strides)),
            "tokenizer_checkpoint": None
            if self.tokenizer_checkpoint is None
            else str(self.tokenizer_checkpoint),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        record = {f.name: _json(getattr(self, f.name)) for f in fields(self) if f.name != "tokenizer"}
        tokenizer = {k: v for k, v in self.tokenizer.to_dict().items() if k != "in_channels"}
        return {**record, "tokenizer": tokenizer}

    @classmethod
    def from_dict(cls, values: dict[str, Any], owner: str = "network 'holohisto'") -> HoloHistoConfig:
        values = dict(values)
        tokenizer = values.pop("tokenizer", None)
        own = _checked(values, _names(cls) - {"tokenizer"}, owner)
        if isinstance(tokenizer, TokenizerConfig):
            own["tokenizer"] = tokenizer
        elif tokenizer is not None:
            own["tokenizer"] = TokenizerConfig.from_dict(dict(tokenizer), owner=f"{owner}, tokenizer")
        return _made(cls, owner, **own)

    def updated(self, overrides: dict[str, Any]) -> HoloHistoConfig:
        """This config with some keys replaced; a "tokenizer" dict replaces single tokenizer keys."""
        overrides = dict(overrides)
        tokenizer = overrides.pop("tokenizer", None) or {}
        if isinstance(tokenizer, TokenizerConfig):
            tokenizer = tokenizer.to_dict()
        record = self.to_dict()
        return HoloHistoConfig.from_dict(
            {**record, **overrides, "tokenizer": {**record["tokenizer"], **tokenizer}}
        )
