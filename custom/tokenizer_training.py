"""The pieces train_tokenizer.json composes with MONAI's AdversarialTrainer to train the tokenizer as a VQGAN.

The trainer (monai.engines.AdversarialTrainer) runs, every iteration: the autoencoder (tokenizer +
decoder) on a batch of slide patches, the discriminator on the reconstruction, the generator step
(reconstruction loss + adversarial loss), then the discriminator step. What MONAI lacks is here:

- `VQGANLoss`: the taming VQGAN objective split into the three callables the trainer takes:
  `reconstruction` (L1 + optional perceptual + codebook/commitment), `generator` (patch adversarial
  loss, with taming's adaptive weight) and `discriminator`; plus `discriminate`, the trainer's
  discriminator inferer. Until `adversarial_start` steps have run, the discriminator is not run at
  all and both adversarial terms are zero, so early steps cost what an autoencoder step costs.
- `perceptual_loss`: MONAI's PerceptualLoss only from a local weights file; never downloads.
- `CodebookHealth`: perplexity, used and dead codes of the codebook, to TensorBoard and the log.
- `TamingWeights` and `TrainingProgress`: records for MONAI's CheckpointSaver/Loader, so a checkpoint
  holds the tokenizer alone (or the whole VQGAN) keyed as taming's VQModel, which is what
  `HoloHistoNet.load_tokenizer` / `load_taming_checkpoint` read; `save_tokenizer` writes the same file
  from Python.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.losses import PatchAdversarialLoss
from torch import nn

from custom.errors import ConfigError
from custom.io import unwrap, write_atomic
from custom.networks.decoder import VQAutoencoder, tokenizer_state_dict
from custom.networks.quantizer import perplexity
from custom.networks.taming import _taming_keys
from custom.networks.tokenizer import VQTokenizer
from custom.training import NonFiniteLossError

logger = logging.getLogger(__name__)

# taming's bounds on the adaptive adversarial weight: the floor keeps a vanishing adversarial gradient
# from dividing by zero, the clamp keeps the weight finite when it does vanish.
ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4
# The engine output keys the loss adds, next to MONAI's AdversarialKeys.
LOSS_TERMS = (
    "loss",
    "l1",
    "perceptual",
    "codebook",
    "generator_loss",
    "discriminator_loss",
    "adversarial_weight",
)


class VQGANLoss(nn.Module):
    """taming's VQGAN objective, in the three pieces MONAI's AdversarialTrainer calls.

    Generator step: loss = l1_weight * |x - x_hat| + perceptual_weight * P(x, x_hat)
    + codebook_weight * (codebook + beta * commitment) + lambda * adversarial_weight * G(D(x_hat)),
    where lambda is taming's adaptive weight ||grad nll|| / ||grad G|| at the decoder's last layer
    (nll = the L1 + perceptual part) when `adaptive_weight`, else 1. Discriminator step: the mean of
    D's real and fake losses. Both adversarial terms are zero, and D is not run, until the iteration
    passes `adversarial_start` (taming's disc_start): a GAN on a random autoencoder only adds noise.

    Attach it to the trainer as a handler: it follows the trainer's iteration (so a resumed run keeps
    its schedule) and adds its terms to the iteration output for the stats handlers.
    """

    def __init__(
        self,
        network: nn.Module,
        l1_weight: float = 1.0,
        codebook_weight: float = 1.0,
        perceptual: nn.Module | None = None,
        perceptual_weight: float = 1.0,
        adversarial_criterion: str = "least_squares",
        adversarial_weight: float = 0.8,
        adaptive_weight: bool = True,
        adversarial_start: int = 10000,
    ):
        super().__init__()
        # kept out of the module tree so the loss never owns (or double-saves) the network's weights
        self.__dict__["network"] = network
        self.l1_weight = l1_weight
        self.codebook_weight = codebook_weight
        self.perceptual = perceptual
        self.perceptual_weight = perceptual_weight
        self.adversarial = PatchAdversarialLoss(criterion=adversarial_criterion)
        self.adversarial_weight = adversarial_weight
        self.adaptive_weight = adaptive_weight
        self.adversarial_start = adversarial_start
        self.iteration = 0
        self.terms: dict[str, float] = {}
        self._nll: torch.Tensor | None = None

    @property
    def adversarial_active(self) -> bool:
        return self.adversarial_weight > 0 and self.iteration > self.adversarial_start

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._follow)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._report)

    def _follow(self, engine) -> None:
        self.iteration = engine.state.iteration
        self.terms = {}

    def _report(self, engine) -> None:
        output = engine.state.output
        if not isinstance(output, dict):
            return
        if "loss" not in output and "reconstruction_loss" in output:
            # monai 1.6.1's AdversarialTrainer sets the generator's total "loss" only on its AMP path.
            output["loss"] = (output["reconstruction_loss"] + output["generator_loss"]).detach()
        output.update(self.terms)

    def reconstruction(self, fakes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets = targets.as_subclass(torch.Tensor).to(fakes.dtype)
        l1 = (fakes - targets).abs().mean()
        nll = self.l1_weight * l1
        perceptual = torch.zeros((), device=fakes.device)
        if self.perceptual is not None and self.perceptual_weight:
            # MONAI's torchvision perceptual net normalises its inputs in place: give it copies.
            perceptual = self.perceptual(fakes.float().clone(), targets.float().clone())
            nll = nll + self.perceptual_weight * perceptual
        codebook = unwrap(self.__dict__["network"]).aux_loss()
        loss = nll + self.codebook_weight * codebook
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"the tokenizer's reconstruction loss became {loss.item()} at step {self.iteration}; stopped "
                "before updating the weights. Lower the learning rate or turn AMP off."
            )
        self._nll = nll
        self.terms.update(
            {
                "l1": l1.detach().item(),
                "perceptual": perceptual.detach().item(),
                "codebook": codebook.detach().item(),
            }
        )
        return loss

    def generator(self, fake_logits: list[torch.Tensor]) -> torch.Tensor:
        if not self.adversarial_active:
            self.terms["adversarial_weight"] = 0.0
            return torch.zeros((), device=unwrap(self.__dict__["network"]).last_layer.device)
        raw = self.adversarial(fake_logits[-1], target_is_real=True, for_discriminator=False)
        weight = self.adversarial_weight
        if self.adaptive_weight and self._nll is not None and torch.is_grad_enabled():
            weight = weight * self._adaptive_factor(raw)
        self.terms["adversarial_weight"] = float(weight)
        return weight * raw

    def _adaptive_factor(self, adversarial: torch.Tensor) -> float:
        """taming's calculate_adaptive_weight: balance the two gradients at the decoder's output layer."""
        last_layer = unwrap(self.__dict__["network"]).last_layer
        nll_grad = torch.autograd.grad(self._nll, last_layer, retain_graph=True)[0]
        adversarial_grad = torch.autograd.grad(adversarial, last_layer, retain_graph=True)[0]
        factor = nll_grad.norm() / (adversarial_grad.norm() + ADAPTIVE_EPS)
        return float(factor.clamp(0.0, ADAPTIVE_MAX))

    def discriminator(self, real_logits: list[torch.Tensor], fake_logits: list[torch.Tensor]) -> torch.Tensor:
        if not self.adversarial_active:
            # Zero, yet connected to every discriminator weight: the trainer's backward() and its AMP
            # grad scaler (which insists on gradients to check) then see all-zero gradients, on which
            # Adam (no weight decay) leaves the weights exactly as they are.
            network = self.__dict__.get("_discriminator")
            if network is None:
                return torch.zeros((), requires_grad=True)
            return sum(p.sum() for p in network.parameters()) * 0.0
        real = self.adversarial(real_logits[-1], target_is_real=True, for_discriminator=True)
        fake = self.adversarial(fake_logits[-1], target_is_real=False, for_discriminator=True)
        return (real + fake) / 2

    def discriminate(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> list:
        """The trainer's d_inferer: the discriminator's outputs, or nothing while it is off."""
        if not self.adversarial_active:
            self.__dict__["_discriminator"] = network
            return []
        return network(inputs, *args, **kwargs)


def loss_terms(output: dict) -> dict[str, float]:
    """The scalar terms of a tokenizer-training iteration, for StatsHandler / TensorBoardStatsHandler."""
    return {k: float(torch.as_tensor(output[k]).detach()) for k in LOSS_TERMS if k in output}


def autoencoder_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs: Any):
    """prepare_batch for an autoencoder: the target of a reconstruction is its input image."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking, **kwargs)
    return image, image


def perceptual_loss(
    weights: str | None, state_dict_key: str | None = None, device: torch.device | str | None = None
) -> nn.Module | None:
    """MONAI's PerceptualLoss on a local torchvision ResNet-50 weights file, or None without one.

    MONAI's PerceptualLoss fetches weights from the internet unless it gets a file, so it is only
    built with `pretrained_path`: nothing is ever downloaded, and with no file there is no perceptual
    term. ("resnet50" is the only one of its networks that takes a local file; LPIPS's alex/vgg
    always download their backbones.)
    """
    if not weights:
        return None
    path = Path(weights)
    if not path.is_file():
        raise ConfigError(
            f"{path}: perceptual-loss weights not found (leave perceptual_weights empty to train without)"
        )
    try:
        import torchvision  # noqa: F401  (MONAI imports it lazily and fails late without it)
    except ImportError as err:
        raise ConfigError(
            "the perceptual loss needs torchvision for its ResNet-50 (pip install torchvision), or leave "
            "perceptual_weights empty"
        ) from err
    from monai.losses import PerceptualLoss

    try:
        loss = PerceptualLoss(
            spatial_dims=2,
            network_type="resnet50",
            is_fake_3d=False,
            pretrained=True,
            pretrained_path=str(path),
            pretrained_state_dict_key=state_dict_key,
        )
    # unpickling errors, missing keys, wrong shapes: all mean "not ResNet-50 weights we can use"
    except Exception as err:
        raise ConfigError(
            f"{path}: cannot be loaded as torchvision ResNet-50 weights for the perceptual loss ({err})"
        ) from err
    return loss if device is None else loss.to(device)


class CodebookHealth:
    """Codebook usage over a window of iterations (or an epoch), to TensorBoard and the log.

    Counts the codes of every forward of `network` (its quantizer's `last_counts`) and, every `interval`
    iterations (or at each epoch end when `epoch_level`, e.g. on the evaluator), reports over that window:
    `perplexity` (exp of the code-usage entropy: how many codes are effectively in use), `used_codes` and
    `dead_codes` (codes no token picked). Values go to `<tag>/perplexity` etc. in TensorBoard, to
    engine.state.metrics as `<tag>_perplexity` etc., and to `history`.
    """

    def __init__(
        self,
        network: nn.Module,
        interval: int = 20,
        log_dir: str | None = None,
        tag: str = "codebook",
        epoch_level: bool = False,
    ):
        self.__dict__["network"] = network
        self.interval = interval
        self.log_dir = log_dir
        self.tag = tag
        self.epoch_level = epoch_level
        self.history: list[dict[str, float]] = []
        self._counts: torch.Tensor | None = None
        self._writer = None

    @property
    def quantizer(self):
        network = unwrap(self.__dict__["network"])
        return getattr(network, "tokenizer", network).quantize

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        if self.epoch_level:
            engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._flush)

    def _reset(self, engine=None) -> None:
        self._counts = None

    def _count(self, engine) -> None:
        counts = self.quantizer.last_counts.detach().float()
        self._counts = counts.clone() if self._counts is None else self._counts + counts.to(self._counts)
        if not self.epoch_level and engine.state.iteration % self.interval == 0:
            self._flush(engine)
            self._reset()

    def _flush(self, engine) -> None:
        if self._counts is None:
            return
        counts = self._counts.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        used = int((counts > 0).sum())
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        record = {
            "step": step,
            "perplexity": float(perplexity(counts)),
            "used_codes": used,
            "dead_codes": len(counts) - used,
        }
        self.history.append(record)
        for name in ("perplexity", "used_codes", "dead_codes"):
            engine.state.metrics[f"{self.tag}_{name}"] = record[name]
        if self.log_dir and _is_rank_zero():
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=self.log_dir)
            for name in ("perplexity", "used_codes", "dead_codes"):
                self._writer.add_scalar(f"{self.tag}/{name}", record[name], step)
            self._writer.flush()
        logger.info(
            "%s at %s %d: perplexity %.1f, %d used and %d dead of %d codes",
            self.tag,
            "epoch" if self.epoch_level else "iteration",
            step,
            record["perplexity"],
            used,
            record["dead_codes"],
            len(counts),
        )


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class TamingWeights:
    """A checkpoint record (ignite's state_dict protocol) of an autoencoder's weights keyed as taming's VQModel.

    With decoder=False it is the tokenizer alone (encoder.*, quant_conv.*, quantize.embedding.weight):
    saved under "state_dict", the file loads into a segmentation net through `tokenizer_checkpoint`. With
    decoder=True it is the whole VQGAN (plus post_quant_conv.*, decoder.*), which loads there too (the
    decoder keys are ignored) and resumes or evaluates the autoencoder.
    """

    def __init__(self, network: nn.Module, decoder: bool = False):
        self.__dict__["network"] = network
        self.decoder = decoder

    def state_dict(self) -> dict[str, torch.Tensor]:
        network = unwrap(self.__dict__["network"])
        state = network.taming_state_dict() if self.decoder else tokenizer_state_dict(network)
        return {k: v.detach().cpu() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        network = unwrap(self.__dict__["network"])
        if self.decoder:
            network.load_taming_state_dict(state)
            return
        tokenizer = network.tokenizer
        expected = _taming_keys(tokenizer.state_dict())
        if set(state) != set(expected):
            raise ConfigError(f"tokenizer weights differ in keys: {sorted(set(state) ^ set(expected))[:8]}")
        tokenizer.load_state_dict(state, strict=False)
        tokenizer.quantize.initialized.fill_(True)


class TrainingProgress:
    """A checkpoint record of a trainer's iteration and epoch, so a resumed run continues its schedule.

    MONAI's AdversarialTrainer's own state_dict holds the networks and optimizers as objects (it pickles
    them), which a weights-only checkpoint cannot hold; the weights and optimizers are saved as their
    own entries instead, and this keeps the counters.
    """

    def __init__(self, engine):
        self.__dict__["engine"] = engine

    def state_dict(self) -> dict[str, int]:
        state = self.__dict__["engine"].state
        return {"iteration": int(state.iteration), "epoch": int(state.epoch)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        engine_state = self.__dict__["engine"].state
        engine_state.iteration = int(state["iteration"])
        engine_state.epoch = int(state["epoch"])


def save_tokenizer(path: str | Path, tokenizer: VQTokenizer | VQAutoencoder) -> Path:
    """Write a tokenizer alone as train_tokenizer.json's tokenizer.pt is written, atomically.

    {"state_dict": taming-keyed tokenizer weights, "tokenizer_config": its constructor arguments}; the
    segmentation net loads it with `tokenizer_checkpoint` (strict keys and shapes).
    """
    tokenizer = getattr(unwrap(tokenizer), "tokenizer", tokenizer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in _taming_keys(tokenizer.state_dict()).items()}
    return write_atomic(
        path, lambda tmp: torch.save({"state_dict": state, "tokenizer_config": dict(tokenizer.config)}, tmp)
    )
