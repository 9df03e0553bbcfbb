"""The vector quantizer of the tokenizer: nearest code, straight-through gradient, codebook health.

`VectorQuantizer` keeps the codebook healthy (the CPU prototype collapsed to 8-19 of 256 codes): it
can initialise the codebook by k-means on the first training batch, counts code usage, and restarts
dead codes from encoder outputs. Those are plain methods, so a tokenizer-training loop calls them too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# Lloyd iterations for the data-based codebook initialisation; more barely moves the codes.
KMEANS_ITERATIONS = 10
# Rows per distance matrix in `nearest`: bounds it to 64k x num_codes floats (256 MB at 1024 codes)
# when k-means runs over many images' vectors.
NEAREST_ROWS_PER_STEP = 65536


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
