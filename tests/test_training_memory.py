"""Training memory switches change memory only: checkpointing, the frozen tokenizer's no_grad, bf16 norms.

Everything runs the tiny net on the CPU at small sizes; what is asserted is values (gradients, buffers,
losses, logits) and what autograd keeps, never time.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from custom.bundle import config_parser
from custom.networks import holohisto_tiny
from custom.networks.blocks import taming_norm

SIDE_PX = 512  # two tokenizer windows a side: the window batches below split the patch


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextlib.contextmanager
def kept_for_backward():
    """Counts the elements autograd saves for backward inside the block (the activations a step holds)."""
    counter = {"elements": 0}

    def pack(tensor):
        counter["elements"] += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield counter


def _step(frozen: bool, checkpointing: bool, weights=None):
    torch.manual_seed(0)
    model = holohisto_tiny(freeze_tokenizer=frozen, tokenizer={"kmeans_init": False, "window_batch": 2})
    if weights is not None:
        model.load_state_dict(weights)
    model.set_grad_checkpointing(checkpointing)
    model.train()
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, SIDE_PX, SIDE_PX, generator=generator)
    labels = (torch.rand(2, SIDE_PX, SIDE_PX, generator=generator) > 0.7).long()
    with kept_for_backward() as kept:
        loss = F.cross_entropy(model(images), labels) + model.aux_loss()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, loss.detach(), grads, kept["elements"]


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable_tokenizer", "frozen_tokenizer"])
def test_grad_checkpointing_gives_the_same_step_and_keeps_far_less(frozen):
    weights = holohisto_tiny(tokenizer={"kmeans_init": False}).state_dict()
    reference, loss, grads, kept = _step(frozen, False, weights)
    checkpointed, loss_ck, grads_ck, kept_ck = _step(frozen, True, weights)
    assert torch.equal(loss_ck, loss)
    assert grads_ck.keys() == grads.keys() and len(grads) > 100
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ck[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # The recomputation in backward leaves batch-norm statistics as one forward left them.
    buffers = dict(reference.named_buffers())
    for name, buffer in checkpointed.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    assert reference.head.steps[0].block.main.depth_conv.norm.num_batches_tracked.item() == 1
    # Measured 0.17 (trainable) and 0.25 (frozen) of the plain step's saved elements at this size.
    assert kept_ck < 0.35 * kept


def test_a_frozen_tokenizer_records_no_graph_and_hands_on_only_tokens_and_skips():
    for frozen in (True, False):
        model = holohisto_tiny(freeze_tokenizer=frozen).train()
        inside = {"elements": 0, "active": False}

        def pack(tensor, inside=inside):
            if inside["active"]:
                inside["elements"] += tensor.numel()
            return tensor

        model.tokenizer.register_forward_pre_hook(lambda *_, inside=inside: inside.update(active=True))
        model.tokenizer.register_forward_hook(lambda *_, inside=inside: inside.update(active=False))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            features = model.forward_features(torch.rand(1, 3, 256, 256))
        skips = [features[f"skip{s}"] for s in model.skip_strides]
        if frozen:
            assert inside["elements"] == 0
            assert not any(skip.requires_grad for skip in skips)
            assert all(features[f"stage{i}"].requires_grad for i in range(len(model.stages)))
        else:  # the control: a trainable tokenizer does record its graph
            assert inside["elements"] > 0 and all(skip.requires_grad for skip in skips)


def test_group_norm_stays_in_the_autocast_dtype_within_bf16_tolerance():
    torch.manual_seed(0)
    norm = taming_norm(64, 32)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    reference = torch.nn.GroupNorm(32, 64, eps=1e-6)
    reference.load_state_dict(norm.state_dict())  # same keys: taming checkpoints load unchanged
    x = torch.randn(2, 64, 32, 32) * 3 + 1
    assert torch.equal(norm(x), reference(x))  # without autocast: exactly torch's GroupNorm
    with torch.device("meta"):  # FLOP counting runs the net on the meta device, where autocast does not exist
        assert taming_norm(64, 32)(torch.empty(2, 64, 8, 8)).is_meta
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = norm(x.bfloat16())
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: outputs up to ~10 are within 2^-8 relative of float32.
    torch.testing.assert_close(low.float(), reference(x), rtol=2**-7, atol=2**-6)


def test_tiny_net_under_bf16_autocast_matches_float32_within_bf16_tolerance():
    torch.manual_seed(0)
    model = holohisto_tiny().eval()
    images = torch.rand(1, 3, SIDE_PX, SIDE_PX)
    with torch.no_grad():
        reference = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(images)
    assert low.dtype == torch.bfloat16
    # Measured: largest difference 0.008 on logits up to 1.18 (random weights, 512 px).
    torch.testing.assert_close(low.float(), reference, rtol=0.02, atol=0.02)


def test_train_json_checkpoints_the_full_size_and_tiny_json_does_not():
    with torch.device("meta"):
        full = config_parser("train.json").get_parsed_content("network_def")
    assert full.grad_checkpointing and full.tokenizer.grad_checkpointing and full.head.grad_checkpointing
    assert full.config["vit_widths"] == [192, 384]
    tiny = config_parser("train.json", "tiny.json").get_parsed_content("network_def")
    assert not tiny.grad_checkpointing and tiny.config["vit_widths"] == [48, 64]
    # The tokenizer's own training: checkpointed windows for the full size, not for the tiny one.
    with torch.device("meta"):
        autoencoder = config_parser("train_tokenizer.json").get_parsed_content("autoencoder_def")
    assert autoencoder.tokenizer.grad_checkpointing
    tiny_autoencoder = config_parser("train_tokenizer.json", "train_tokenizer_tiny.json")
    assert not tiny_autoencoder.get_parsed_content("autoencoder_def").tokenizer.grad_checkpointing
