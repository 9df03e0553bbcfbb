"""The image tokenizer: a taming-transformers VQGAN encoder, a vector quantizer, and the window tiling.

`Encoder` reproduces taming's `Encoder` module tree and numerics (conv_in, down[i].block[j] ResnetBlocks,
down[i].attn[j], down[i].downsample, mid.block_1/attn_1/block_2, norm_out, conv_out), so a taming
VQModel checkpoint loads key for key with `load_taming_checkpoint`. One addition: `stem_stride=2` folds
the first downsampling into conv_in, which the CPU-sized tokenizer uses to avoid many-channel convs at
full resolution (such a tokenizer no longer matches a taming checkpoint, and the loader says so).

`VQTokenizer` applies the encoder to non-overlapping windows of its training size (256 px by default)
laid over the input, a few windows at a time, and reassembles the token grid and the encoder's
higher-resolution features (the head's skips). The encoder's softmax attention therefore only ever
sees one window's tokens, and tokenizing costs time linear in pixels.

`VectorQuantizer` keeps the codebook healthy (the CPU prototype collapsed to 8-19 of 256 codes): it
can initialise the codebook by k-means on the first training batch, counts code usage, and restarts
dead codes from encoder outputs. Those are plain methods, so a tokenizer-training loop calls them too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from custom.errors import ConfigError
from custom.networks.blocks import Downsample, ResnetBlock, taming_norm

# Lloyd iterations for the data-based codebook initialisation; more barely moves the codes.
KMEANS_ITERATIONS = 10
# Rows per distance matrix in `nearest`: bounds it to 64k x num_codes floats (256 MB at 1024 codes)
# when k-means runs over many images' vectors.
NEAREST_ROWS_PER_STEP = 65536
# How many offending keys an error message lists before it only counts the rest.
LISTED_KEYS = 8


class AttnBlock(nn.Module):
    """taming's single-head softmax self-attention over a feature map (q, k, v, proj_out are 1x1 convs)."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = taming_norm(channels, norm_groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        height, width = h.shape[-2:]
        # Contiguous, so SDPA can take its flash kernel rather than materialising the attention matrix.
        q, k, v = (
            rearrange(conv(h), "b c h w -> b 1 (h w) c").contiguous() for conv in (self.q, self.k, self.v)
        )
        # SDPA's default scale 1/sqrt(c) is taming's int(c) ** -0.5.
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(out, "b 1 (h w) c -> b c h w", h=height, w=width))


class EncoderLevel(nn.Module):
    """One resolution of the encoder: ResnetBlocks (each followed by attention where taming puts it)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attn: bool,
        downsample: bool,
        norm_groups: int,
    ):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, norm_groups)
            for i in range(num_res_blocks)
        )
        self.attn = nn.ModuleList(AttnBlock(out_channels, norm_groups) for _ in range(num_res_blocks) if attn)
        self.downsample = Downsample(out_channels) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """taming's VQGAN Encoder (double_z=False) with an optional stride-2 stem; returns z and level features."""

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 256,
        z_channels: int = 256,
        stem_stride: int = 1,
        norm_groups: int = 32,
    ):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(
                f"stem_stride must be 1 (taming) or 2 (first downsampling folded in), got {stem_stride}"
            )
        self.conv_in = nn.Conv2d(in_channels, ch, 3, stem_stride, 1)
        in_ch_mult = (1, *ch_mult)
        current_res = resolution // stem_stride
        self.down = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            self.down.append(
                EncoderLevel(
                    ch * in_ch_mult[i],
                    ch * mult,
                    num_res_blocks,
                    current_res in attn_resolutions,
                    not last,
                    norm_groups,
                )
            )
            current_res //= 2
        block_in = ch * ch_mult[-1]
        self.mid = MidBlock(block_in, norm_groups)
        self.norm_out = taming_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)
        self.level_strides = [stem_stride * 2**i for i in range(len(ch_mult))]
        self.level_channels = [ch * mult for mult in ch_mult]

    def forward(
        self, x: torch.Tensor, skip_strides: Sequence[int] = (), to_tokens: bool = True
    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """x in [-1, 1] -> (z at the last level's stride, or None; level features at `skip_strides`, finest first).

        With to_tokens=False the encoder stops after the coarsest requested skip.
        """
        last_level = len(self.down) - 1
        if not to_tokens:
            last_level = max(self.level_strides.index(s) for s in skip_strides)
        h = self.conv_in(x)
        skips = []
        for i in range(last_level + 1):
            level = self.down[i]
            h = level(h)
            if self.level_strides[i] in skip_strides:
                skips.append(h)
            if level.downsample is not None and (to_tokens or i < last_level):
                h = level.downsample(h)
        if not to_tokens:
            return None, skips
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True)), skips

    def modules_after(self, stride: int) -> list[nn.Module]:
        """Modules a run that stops after the level at `stride` never uses."""
        level = self.level_strides.index(stride)
        unused = [
            self.down[level].downsample,
            *self.down[level + 1 :],
            self.mid,
            self.norm_out,
            self.conv_out,
        ]
        return [m for m in unused if m is not None]


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # B x D x h x w, straight-through: forward = codes, backward = identity to z
    loss: torch.Tensor  # codebook + beta * commitment
    indices: torch.Tensor  # B x h x w code indices


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code-usage histogram: the number of equally used codes that would look the same."""
    probs = counts.float() / counts.sum().clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=torch.finfo(probs.dtype).tiny))).sum()
    return torch.exp(entropy)


class VectorQuantizer(nn.Module):
    """Nearest-code vector quantizer (VQ-VAE) with a straight-through gradient and codebook health tools.

    loss = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 (mean over elements). taming's own module put beta
    on the other term; this is the VQ-VAE paper's form, which is what `beta` means in configs.

    Usage: every forward leaves `last_counts` (codes used by that forward); in training mode counts
    also accumulate in `code_counts` until `restart_dead_codes` (called every `restart_every` training
    forwards when it is > 0, or by hand) gives unused codes new values drawn from encoder outputs.
    With `kmeans_init`, the first training forward sets the codebook by k-means of its encoder outputs
    (the `initialized` buffer, saved in checkpoints, makes that happen once).
    """

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        beta: float = 0.25,
        kmeans_init: bool = False,
        restart_every: int = 0,
    ):
        super().__init__()
        self.num_codes = num_codes
        self.beta = beta
        self.restart_every = restart_every
        self.embedding = nn.Embedding(num_codes, code_dim)
        # taming's initialisation, kept so an un-initialised quantizer behaves like the reference.
        nn.init.uniform_(self.embedding.weight, -1.0 / num_codes, 1.0 / num_codes)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("code_counts", torch.zeros(num_codes), persistent=False)
        self.last_counts = torch.zeros(num_codes)
        self.training_steps = 0

    def nearest(self, vectors: torch.Tensor, codebook: torch.Tensor | None = None) -> torch.Tensor:
        """Index of the nearest code (squared Euclidean) for each row of an N x D matrix, in float32."""
        codebook = self.embedding.weight if codebook is None else codebook
        with torch.autocast(device_type="cuda" if vectors.is_cuda else "cpu", enabled=False):
            codebook = codebook.float()
            code_sq = codebook.pow(2).sum(1)[None]
            indices = [
                (rows.pow(2).sum(1, keepdim=True) - 2 * rows @ codebook.t() + code_sq).argmin(dim=1)
                for rows in vectors.float().split(NEAREST_ROWS_PER_STEP)
            ]
        return torch.cat(indices)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        batch, _, height, width = z.shape
        flat = rearrange(z, "b d h w -> (b h w) d")
        if self.training and not bool(self.initialized):
            self.init_codebook(flat)
        indices = self.nearest(flat.detach())
        codes = rearrange(self.embedding(indices), "(b h w) d -> b d h w", b=batch, h=height, w=width)
        loss = F.mse_loss(codes, z.detach().to(codes.dtype)) + self.beta * F.mse_loss(
            z.to(codes.dtype), codes.detach()
        )
        quantized = z + (codes - z).detach()
        return QuantizerOutput(quantized, loss, indices.view(batch, height, width))

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices B x h x w -> code vectors B x D x h x w."""
        return rearrange(self.embedding(indices), "b h w d -> b d h w")

    @torch.no_grad()
    def record_usage(self, indices: torch.Tensor, vectors: torch.Tensor) -> None:
        """Count one forward's codes; in training mode accumulate and restart dead codes when due.

        `vectors` (B x D x h x w encoder outputs of this forward) are the restart's source of new codes.
        """
        ones = torch.ones(indices.numel(), device=indices.device)
        counts = torch.zeros(self.num_codes, device=indices.device).index_add_(0, indices.flatten(), ones)
        self.last_counts = counts
        if not self.training:
            return
        self.code_counts += counts
        self.training_steps += 1
        if self.restart_every > 0 and self.training_steps % self.restart_every == 0:
            self.restart_dead_codes(rearrange(vectors, "b d h w -> (b h w) d"))

    @torch.no_grad()
    def restart_dead_codes(self, vectors: torch.Tensor) -> int:
        """Give every code unused since the last restart a random row of `vectors`; returns how many.

        Under DDP the counts are summed over ranks first and rank 0's new codebook is broadcast, so the
        replicas stay identical.
        """
        counts = self.code_counts.clone()
        if _is_distributed():
            dist.all_reduce(counts)
        dead = torch.nonzero(counts == 0).flatten()
        if len(dead):
            rows = vectors.detach().reshape(-1, vectors.shape[-1])
            picks = torch.randint(len(rows), (len(dead),), device=rows.device)
            self.embedding.weight[dead] = rows[picks].to(self.embedding.weight)
            if _is_distributed():
                dist.broadcast(self.embedding.weight.data, src=0)
        self.code_counts.zero_()
        return len(dead)

    @torch.no_grad()
    def init_codebook(self, vectors: torch.Tensor, iterations: int = KMEANS_ITERATIONS) -> None:
        """Set the codebook to k-means centres of `vectors` (N x D), seeded by k-means++.

        k-means++ seeds far-apart codes, so small clusters of rare tissue still get a code. With fewer
        vectors than codes some codes start as duplicates; they stay unused until a dead-code restart.
        """
        vectors = vectors.detach().reshape(-1, vectors.shape[-1]).float()
        count = len(vectors)
        centres = vectors.new_empty((self.num_codes, vectors.shape[1]))
        centres[0] = vectors[torch.randint(count, (1,), device=vectors.device)]
        nearest_sq = (vectors - centres[0]).pow(2).sum(1)
        for i in range(1, self.num_codes):
            weights = nearest_sq if nearest_sq.sum() > 0 else torch.ones_like(nearest_sq)
            centres[i] = vectors[torch.multinomial(weights, 1)]
            nearest_sq = torch.minimum(nearest_sq, (vectors - centres[i]).pow(2).sum(1))
        ones = torch.ones(count, device=vectors.device)
        for _ in range(iterations):
            assignment = self.nearest(vectors, centres)
            sums = torch.zeros_like(centres).index_add_(0, assignment, vectors)
            sizes = torch.zeros(self.num_codes, device=vectors.device).index_add_(0, assignment, ones)
            filled = sizes > 0
            centres[filled] = sums[filled] / sizes[filled, None]
        self.embedding.weight.copy_(centres)
        self.initialized.fill_(True)
        if _is_distributed():
            dist.broadcast(self.embedding.weight.data, src=0)

    def usage(self) -> dict[str, float]:
        """Codebook health of the last forward, as plain numbers for a logger."""
        used = int((self.last_counts > 0).sum())
        return {
            "perplexity": float(perplexity(self.last_counts)),
            "used_codes": used,
            "dead_codes": self.num_codes - used,
        }


def _row_runs(positions: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """(image, row, column) window positions in raster order -> (image, row, first column, end column) runs."""
    runs: list[tuple[int, int, int, int]] = []
    for b, r, q in positions:
        if runs and runs[-1][:2] == (b, r) and runs[-1][3] == q:
            runs[-1] = (b, r, runs[-1][2], q + 1)
        else:
            runs.append((b, r, q, q + 1))
    return runs


class TokenizerOutput(NamedTuple):
    tokens: torch.Tensor  # B x code_dim x H/f x W/f quantized vectors (straight-through)
    indices: torch.Tensor  # B x H/f x W/f code indices
    loss: torch.Tensor  # the quantizer's codebook + commitment loss
    skips: list[torch.Tensor]  # encoder features at the requested strides, finest first


class VQTokenizer(nn.Module):
    """Windowed VQGAN tokenizer: encoder + quant_conv + quantize, keyed like a taming VQModel.

    Arguments are taming's ddconfig names (ch, ch_mult, num_res_blocks, attn_resolutions, resolution,
    z_channels), `num_codes`/`code_dim` (taming's n_embed/embed_dim), plus `stem_stride`, `norm_groups`,
    the quantizer's options, and `window_batch`: how many `resolution`-sized windows are encoded at a
    time, which bounds the encoder's working memory at inference whatever the input size.
    `checkpoint_windows` does the same for training: each window batch's encoder activations are
    recomputed in backward instead of kept (one more encoder forward per step), so a trainable
    tokenizer holds only its outputs for the whole patch.
    """

    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 256,
        z_channels: int = 256,
        num_codes: int = 1024,
        code_dim: int = 256,
        beta: float = 0.25,
        stem_stride: int = 1,
        norm_groups: int = 32,
        kmeans_init: bool = False,
        restart_every: int = 0,
        window_batch: int = 16,
        checkpoint_windows: bool = False,
    ):
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "ch": ch,
            "ch_mult": list(ch_mult),
            "num_res_blocks": num_res_blocks,
            "attn_resolutions": list(attn_resolutions),
            "resolution": resolution,
            "z_channels": z_channels,
            "num_codes": num_codes,
            "code_dim": code_dim,
            "beta": beta,
            "stem_stride": stem_stride,
            "norm_groups": norm_groups,
            "kmeans_init": kmeans_init,
            "restart_every": restart_every,
            "window_batch": window_batch,
            "checkpoint_windows": checkpoint_windows,
        }
        self.encoder = Encoder(
            in_channels,
            ch,
            ch_mult,
            num_res_blocks,
            attn_resolutions,
            resolution,
            z_channels,
            stem_stride,
            norm_groups,
        )
        self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        self.quantize = VectorQuantizer(num_codes, code_dim, beta, kmeans_init, restart_every)
        self.window_px = resolution
        self.window_batch = window_batch
        self.checkpoint_windows = checkpoint_windows
        self.token_stride = self.encoder.level_strides[-1]
        if resolution % self.token_stride:
            raise ValueError(
                f"window {resolution} px is not a multiple of the token stride {self.token_stride}"
            )

    def skip_channels(self, strides: Sequence[int]) -> list[int]:
        levels = self.encoder.level_strides
        missing = [s for s in strides if s not in levels]
        if missing:
            raise ValueError(f"no encoder level at strides {missing}; levels are at strides {levels}")
        return [self.encoder.level_channels[levels.index(s)] for s in strides]

    def _windowed(
        self, x: torch.Tensor, encode: Callable[[torch.Tensor], list[torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Run `encode` on window_batch windows at a time; place the maps it returns into whole-input maps.

        Windows are cut out of x one chunk at a time and each chunk's maps are written straight into
        their place, so besides the outputs only one chunk's worth of memory is live. A chunk is moved
        as runs of windows along a row, one copy per run rather than per window.
        """
        batch, rows, cols = x.shape[0], x.shape[-2] // self.window_px, x.shape[-1] // self.window_px
        positions = [(b, r, q) for b in range(batch) for r in range(rows) for q in range(cols)]
        outputs: list[torch.Tensor] = []
        for start in range(0, len(positions), self.window_batch):
            runs = _row_runs(positions[start : start + self.window_batch])
            row_runs = [x[b, :, self._span(r, 1), self._span(q0, q1 - q0)] for b, r, q0, q1 in runs]
            windows = torch.cat(
                [rearrange(run, "c h (q w) -> q c h w", w=self.window_px) for run in row_runs]
            )
            maps = encode(windows)
            if not outputs:
                outputs = [
                    m.new_empty((batch, m.shape[1], rows * m.shape[2], cols * m.shape[3])) for m in maps
                ]
            for out, chunk_maps in zip(outputs, maps, strict=True):
                size, first = chunk_maps.shape[-1], 0
                for b, r, q0, q1 in runs:
                    count = q1 - q0
                    target = out[b, :, r * size : (r + 1) * size, q0 * size : q1 * size].unflatten(
                        -1, (count, size)
                    )
                    target.copy_(rearrange(chunk_maps[first : first + count], "q c h w -> c h q w"))
                    first += count
        return outputs

    def _span(self, first: int, count: int) -> slice:
        return slice(first * self.window_px, (first + count) * self.window_px)

    def forward(self, x: torch.Tensor, skip_strides: Sequence[int] = ()) -> TokenizerOutput:
        """x: B x 3 x H x W in [-1, 1], H and W multiples of the window; returns tokens, codes, loss, skips."""
        losses: list[torch.Tensor] = []
        vectors = torch.empty(0)  # the last chunk's encoder outputs: the restart's source of new codes

        def encode(windows: torch.Tensor) -> list[torch.Tensor]:
            nonlocal vectors
            z, skips = self._encoder(windows, skip_strides)
            vectors = self.quant_conv(z)
            quantized = self.quantize(vectors)
            # Weighted by windows so the loss is the mean over all tokens, as one batch would give.
            losses.append(quantized.loss * windows.shape[0])
            return [quantized.quantized, quantized.indices[:, None], *skips]

        tokens, indices, *skips = self._windowed(x, encode)
        self.quantize.record_usage(indices[:, 0], vectors)
        windows_total = x.shape[0] * (x.shape[-2] // self.window_px) * (x.shape[-1] // self.window_px)
        return TokenizerOutput(tokens, indices[:, 0], torch.stack(losses).sum() / windows_total, skips)

    def _encoder(self, windows: torch.Tensor, skip_strides: Sequence[int]):
        # The quantizer stays outside the checkpoint: it updates state (k-means init, usage) that a
        # recomputation must not touch twice. The encoder (GroupNorm, no dropout) recomputes exactly.
        if self.checkpoint_windows and self.training and torch.is_grad_enabled():
            return checkpoint(self.encoder, windows, skip_strides, use_reentrant=False)
        return self.encoder(windows, skip_strides)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantization vectors (quant_conv output) B x code_dim x H/f x W/f, window by window."""
        return self._windowed(x, lambda windows: [self.quant_conv(self.encoder(windows)[0])])[0]

    def encode_skips(self, x: torch.Tensor, skip_strides: Sequence[int]) -> list[torch.Tensor]:
        """Only the encoder features at `skip_strides` (the encoder stops after the coarsest one)."""
        return self._windowed(x, lambda windows: self.encoder(windows, skip_strides, to_tokens=False)[1])

    def modules_unused_without_tokens(self, skip_strides: Sequence[int]) -> list[nn.Module]:
        """What `encode_skips(x, skip_strides)` never runs: frozen when a net uses no tokens."""
        return [*self.encoder.modules_after(max(skip_strides)), self.quant_conv, self.quantize]


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


def load_taming_checkpoint(module: nn.Module, path: str | Path) -> None:
    """Load a taming-transformers VQModel checkpoint into a `VQTokenizer` (or a net holding `.tokenizer`).

    Accepts a `.ckpt` dict with a `state_dict` or a bare state dict, read with weights_only=True. Keeps
    encoder.*, quant_conv.* and quantize.embedding.weight; every one of those the tokenizer has must be
    present with the same shape, and none may be extra. Raises ConfigError naming what does not fit.
    """
    tokenizer = getattr(module, "tokenizer", module)
    if not isinstance(tokenizer, VQTokenizer):
        raise ConfigError(f"{type(module).__name__} has no VQ tokenizer to load {path} into")
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: tokenizer checkpoint not found")
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
    given = _taming_keys(checkpoint)
    problems = state_dict_mismatch(given, _taming_keys(tokenizer.state_dict()), "tokenizer")
    if problems:
        raise ConfigError(
            f"{path}: checkpoint does not fit this tokenizer ({problems}). The tokenizer was built "
            f"with {tokenizer.config}; a taming f16/1024 checkpoint needs the full-size tokenizer "
            "(holohisto_full: ch 128, ch_mult (1, 1, 2, 2, 4), stem_stride 1, 1024 codes x 256)."
        )
    tokenizer.load_state_dict(given, strict=False)
    tokenizer.quantize.initialized.fill_(True)
