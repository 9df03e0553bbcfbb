"""Hard-negative classes: trained as classes of their own, written as background.

A lab can label mimics (context decoys, sclerosed look-alikes, artefacts) as a class of their own, so
that the loss must tell them from the target: as background, DiceCE weighs a mimic pixel no more than
any other background pixel. At inference a mimic's probability joins the background's, P(bg) +
P(mimic), the log-sum-exp of their logits, so the stitcher, the cleanup and every output see only
the classes a lab reports. Folded classes are the highest label values, so the others keep theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from custom.errors import ConfigError


class FoldIntoBackground(nn.Module):
    """Wraps a segmentation net: logits (B, C, ...) -> (B, C - len(classes), ...), folded classes in 0."""

    def __init__(self, network: nn.Module, classes: Sequence[int], num_classes: int):
        super().__init__()
        self.network = network
        self.first = int(num_classes) - len(checked_classes(classes, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x)
        background = torch.logsumexp(torch.cat([logits[:, :1], logits[:, self.first :]], 1), 1, keepdim=True)
        return torch.cat([background, logits[:, 1 : self.first]], 1)


def checked_classes(classes: Sequence[int] | None, num_classes: int) -> list[int]:
    """The folded labels, sorted, as a checkpoint records them: the highest labels, leaving background
    and at least one class. Checked when training starts, not first at inference."""
    classes = sorted(int(c) for c in classes or ())
    first = int(num_classes) - len(classes)
    if classes and (first < 2 or classes != list(range(first, int(num_classes)))):
        raise ConfigError(
            f"background_classes {classes} must be the highest labels of a net with {num_classes} classes, "
            "leaving background and at least one class (e.g. [2] of 3)"
        )
    return classes


def fold_into_background(
    network: nn.Module, classes: Sequence[int] | None, num_classes: int | None
) -> nn.Module:
    """`network` itself when nothing is folded, else the wrapper (weights shared, not copied)."""
    if not classes:
        return network
    if num_classes is None:
        raise ConfigError("background_classes needs the net's num_classes (from its checkpoint)")
    return FoldIntoBackground(network, classes, num_classes)
