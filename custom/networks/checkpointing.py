"""Activation checkpointing that leaves a step exactly as it was: timm's `checkpoint_seq`, batch-norm safe.

torch.utils.checkpoint keeps a segment's inputs, drops its activations and recomputes them in backward.
A batch norm in training mode would update its running statistics a second time during that
recomputation (timm lives with it); here the recomputation leaves them alone, so a checkpointed step
gives the same gradients and the same buffers as a plain one, at the cost of one more forward of the
segment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from functools import partial

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def _running_stats_untouched(module: nn.Module) -> Iterator[None]:
    # Momentum 0 makes the update running * 1 + batch * 0, i.e. the same bits, while the recomputation
    # runs the very ops (and saves the very tensors) the first pass did; its count is put back after.
    norms = [
        m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    ]
    kept = [
        (m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
        for m in norms
    ]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum, count in kept:
            norm.momentum = momentum
            if count is not None:
                norm.num_batches_tracked.copy_(count)


def _contexts(module: nn.Module):
    return contextlib.nullcontext(), _running_stats_untouched(module)


def maybe_checkpoint(enabled: bool, module: nn.Module, *args):
    """module(*args), checkpointed when `enabled` and autograd records (never under no_grad/inference)."""
    if not (enabled and torch.is_grad_enabled()):
        return module(*args)
    return checkpoint(module, *args, use_reentrant=False, context_fn=partial(_contexts, module))


def checkpoint_seq(enabled: bool, modules: Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run `modules` one after the other, each its own checkpointed segment when `enabled`."""
    for module in modules:
        x = maybe_checkpoint(enabled, module, x)
    return x
