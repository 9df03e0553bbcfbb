"""The small pieces train.json composes with MONAI's SupervisedTrainer: loss, guards and records."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

import torch
from monai.handlers import MeanDice, from_engine
from monai.losses import DiceCELoss
from torch import nn

from custom.errors import HoloHistoError
from custom.io import unwrap

logger = logging.getLogger(__name__)


class NonFiniteLossError(HoloHistoError):
    """The loss became NaN or infinite: training stops before the bad gradient reaches the weights."""


class SegmentationLoss(nn.Module):
    """DiceCE on logits plus an auxiliary loss (the quantizer's codebook/commitment terms).

    `aux_loss` is a zero-argument callable read after each forward pass, e.g. `aux_loss_of(network)`:
    handing over the callable, not the network, keeps the network out of the loss's module tree, so
    the loss never owns (or double-saves) its weights.

    The loss is checked before it is returned, so a non-finite loss stops training inside the
    iteration, before backward() and the optimizer step: the weights saved on the way out are the
    last good ones, never NaN.
    """

    def __init__(
        self,
        aux_loss: Callable[[], torch.Tensor] | None = None,
        aux_weight: float = 1.0,
        **dice_ce_kwargs,
    ):
        super().__init__()
        kwargs = {"to_onehot_y": True, "softmax": True, **dice_ce_kwargs}
        self.dice_ce = DiceCELoss(**kwargs)
        self.aux_loss = aux_loss
        self.aux_weight = aux_weight
        self.steps = 0

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        loss = self.dice_ce(logits.float(), target)
        if self.aux_loss is not None and self.aux_weight:
            loss = loss + self.aux_weight * self.aux_loss()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at step {self.steps}; stopped before updating the "
                "weights. Lower the learning rate, check the data for empty or corrupt patches, or turn AMP off."
            )
        return loss


class ConfigRecord:
    """A plain dict saved inside every checkpoint (ignite's Checkpoint protocol).

    train.json records the network's constructor arguments ("network_config") and the patch size
    and level it trained on ("input_config"), so `segment --checkpoint` and the bundle rebuild the
    right network and read slides the same way without extra flags.
    """

    def __init__(self, config: dict):
        self.config = dict(config)

    def state_dict(self) -> dict:
        return dict(self.config)

    def load_state_dict(self, state: dict) -> None:
        self.config = dict(state)


def class_dice_metrics(num_classes: int, class_names: dict | None = None) -> dict:
    """Validation Dice of each foreground class, beside the mean (train.json's `additional_metrics`).

    With 3+ classes the mean can hide a class the net never gets right (a mimic class at 0 beside
    glomeruli at 0.9 reads as 0.45). Two classes: nothing extra, the mean is the one class.
    """
    if int(num_classes) <= 2:
        return {}
    names = {int(k): str(v) for k, v in (class_names or {}).items()}
    metrics = {}
    for c in range(1, int(num_classes)):
        slug = re.sub(r"[^0-9a-z]+", "_", names.get(c, f"class {c}").lower()).strip("_")
        metrics[f"val_dice_{slug}"] = MeanDice(include_background=False, output_transform=_class_pair(c))
    return metrics


def _class_pair(c: int):
    """(pred, label) lists with only the background and class-c channels of each one-hot sample."""

    def pick(output):
        preds, labels = from_engine(["pred", "label"])(output)
        return [p[[0, c]] for p in preds], [y[[0, c]] for y in labels]

    return pick


def total_steps(max_epochs: int, epoch_length: int) -> int:
    return max(1, int(max_epochs) * max(1, int(epoch_length)))


def warmup_steps(max_epochs: int, epoch_length: int, fraction: float = 0.05) -> int:
    """A warmup of `fraction` of the run, at least one step."""
    return max(1, math.ceil(total_steps(max_epochs, epoch_length) * fraction))


def aux_loss_of(network: nn.Module) -> Callable[[], torch.Tensor] | None:
    """The network's `aux_loss` (HoloHisto's quantizer terms), through a DDP wrapper; None for a baseline."""
    return getattr(unwrap(network), "aux_loss", None)


class ProgressBar:
    """ignite's tqdm ProgressBar showing the loss, attachable as a MONAI trainer handler.

    MONAI calls `handler.attach(engine)` with no arguments, so the loss extraction is set here.
    """

    def __init__(self, persist: bool = False):
        from ignite.handlers import ProgressBar as IgniteProgressBar

        self.bar = IgniteProgressBar(persist=persist)

    def attach(self, engine) -> None:
        self.bar.attach(engine, output_transform=_loss_of)


def _loss_of(output) -> dict:
    first = output[0] if isinstance(output, list) else output
    loss = first["loss"] if isinstance(first, dict) else first
    return {"loss": float(loss)}
