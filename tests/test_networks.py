"""The HoloHisto networks: attention numerics, gradients, taming loading, any-size I/O, rebuild, export, quantizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from custom.errors import ConfigError
from custom.networks import (
    LiteMLA,
    SwinUNETRBaseline,
    UNetBaseline,
    VectorQuantizer,
    VQTokenizer,
    build_network,
    holohisto_full,
    holohisto_tiny,
    load_taming_checkpoint,
    network_config,
    perplexity,
    presets,
    relu_linear_attention,
    softmax_attention,
)

TAMING_KEYS_FILE = "taming_vqgan_f16_1024_encoder_keys.json"
# A patch that spans several tokenizer windows and several head tiles, yet runs in well under a second.
SMALL_PX = 256


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread for this module, restored after it.

    These tests check values, never speed. On a 2-core machine shared with other jobs, two OpenMP
    threads stall at every barrier while one is descheduled: this file took 134 s with two threads
    and 26 s with one, on the same loaded machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def naive_relu_attention(qkv: torch.Tensor, head_dim: int, eps: float = 1e-15) -> torch.Tensor:
    """The same formula the O(N^2) way: every query against every key, in float64."""
    batch, _, height, width = qkv.shape
    qkv = qkv.double().reshape(batch, -1, 3 * head_dim, height * width)
    q, k, v = (
        F.relu(qkv[:, :, :head_dim]),
        F.relu(qkv[:, :, head_dim : 2 * head_dim]),
        qkv[:, :, 2 * head_dim :],
    )
    weights = torch.einsum("bhdk,bhdq->bhkq", k, q)  # N_keys x N_queries
    out = torch.einsum("bhdk,bhkq->bhdq", v, weights) / (weights.sum(dim=2, keepdim=True) + eps)
    return out.reshape(batch, -1, height, width)


def naive_softmax_attention(qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
    batch, _, height, width = qkv.shape
    qkv = qkv.double().reshape(batch, -1, 3 * head_dim, height * width)
    q, k, v = qkv[:, :, :head_dim], qkv[:, :, head_dim : 2 * head_dim], qkv[:, :, 2 * head_dim :]
    weights = torch.softmax(torch.einsum("bhdk,bhdq->bhkq", k, q) / math.sqrt(head_dim), dim=2)
    return torch.einsum("bhdk,bhkq->bhdq", v, weights).reshape(batch, -1, height, width)


def test_relu_linear_attention_matches_the_quadratic_formula():
    head_dim, heads = 4, 3
    qkv = torch.randn(2, heads * 3 * head_dim, 5, 7)
    out = relu_linear_attention(qkv, head_dim)
    assert out.shape == (2, heads * head_dim, 5, 7)
    torch.testing.assert_close(out.double(), naive_relu_attention(qkv, head_dim), atol=1e-5, rtol=1e-5)


def test_lite_mla_module_is_projection_of_attention_over_multiscale_qkv():
    mla = LiteMLA(16, 16, head_dim=4, scales=(5,), kernel="linear").eval()
    x = torch.randn(2, 16, 6, 6)
    qkv = mla.qkv(x)
    multiscale = torch.cat([qkv, mla.aggreg[0](qkv)], dim=1)  # 4 original + 4 aggregated heads
    expected = mla.proj(naive_relu_attention(multiscale, 4).float())
    torch.testing.assert_close(mla(x), expected, atol=1e-5, rtol=1e-5)


def test_linear_attention_core_stays_float32_under_bf16_autocast():
    head_dim = 4
    qkv = torch.randn(1, 2 * 3 * head_dim, 6, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = relu_linear_attention(qkv, head_dim)
        module_out = LiteMLA(8, 8, head_dim=head_dim).eval()(torch.randn(1, 8, 6, 6))
    assert out.dtype == torch.float32
    # Exact to float32 precision for the bf16 inputs it got: nothing inside was rounded to bf16.
    torch.testing.assert_close(out.double(), naive_relu_attention(qkv, head_dim), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(module_out).all()


def test_softmax_kernel_matches_quadratic_softmax_attention():
    head_dim = 4
    qkv = torch.randn(2, 2 * 3 * head_dim, 4, 5)
    torch.testing.assert_close(
        softmax_attention(qkv, head_dim).double(),
        naive_softmax_attention(qkv, head_dim),
        atol=1e-5,
        rtol=1e-5,
    )


def _train_step(model: torch.nn.Module, size_px: int = SMALL_PX) -> None:
    model.train()
    images = torch.rand(2, 3, size_px, size_px)
    labels = torch.randint(0, 2, (2, size_px, size_px))
    loss = F.cross_entropy(model(images), labels) + model.aux_loss()
    loss.backward()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"attention": "softmax"},
        {"token_path": "linear"},
        {"token_path": "none"},
        {"skip_strides": ()},
        {"num_classes": 3},
        {"context_branch": "orientation"},
    ],
    ids=["tokenizer", "softmax", "linear", "none", "no_skips", "three_classes", "orientation"],
)
def test_gradient_reaches_every_trainable_parameter(overrides):
    model = holohisto_tiny(**overrides)
    _train_step(model)
    dead = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert dead == []
    if overrides.get("token_path") in ("linear", "none"):
        # What the variant never runs is frozen rather than left to DDP as unused parameters.
        assert not model.tokenizer.quantize.embedding.weight.requires_grad
        assert model.tokenizer.encoder.down[0].block[0].conv1.weight.requires_grad


def test_frozen_tokenizer_gets_no_gradient_and_keeps_its_codebook():
    model = holohisto_tiny(freeze_tokenizer=True)
    codebook = model.tokenizer.quantize.embedding.weight.clone()
    _train_step(model)
    assert not model.tokenizer.training  # train() keeps it in eval: no k-means, no restarts
    for name, param in model.tokenizer.named_parameters():
        assert not param.requires_grad and param.grad is None, name
    rest = [(n, p) for n, p in model.named_parameters() if not n.startswith("tokenizer.")]
    assert rest and all(p.requires_grad and p.grad is not None and p.grad.any() for _, p in rest)
    assert torch.equal(model.tokenizer.quantize.embedding.weight, codebook)
    assert model.aux_loss().item() == 0.0
    assert {"perplexity", "used_codes", "dead_codes"} <= model.codebook_usage().keys()


@pytest.fixture(scope="module")
def taming_key_shapes(fixtures_dir) -> dict[str, list[int]]:
    return json.loads((fixtures_dir / TAMING_KEYS_FILE).read_text())["keys"]


@pytest.fixture(scope="module")
def full_tokenizer() -> VQTokenizer:
    return VQTokenizer(presets.full_tokenizer())


def _random_state(key_shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {key: torch.randn(shape) for key, shape in key_shapes.items()}


def test_taming_checkpoint_loads_strictly_as_ckpt_and_as_bare_state_dict(
    tmp_path, taming_key_shapes, full_tokenizer
):
    state = _random_state(taming_key_shapes)
    # A real VQModel checkpoint also holds the decoder and the GAN loss; those are not the tokenizer's.
    extras = {
        "decoder.conv_in.weight": torch.randn(512, 256, 3, 3),
        "loss.discriminator.main.0.bias": torch.randn(64),
    }
    torch.save({"state_dict": {**state, **extras}, "global_step": 1}, tmp_path / "vqgan.ckpt")
    torch.save(state, tmp_path / "bare.pt")
    for path in (tmp_path / "vqgan.ckpt", tmp_path / "bare.pt"):
        load_taming_checkpoint(full_tokenizer, path)
        loaded = full_tokenizer.state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in state.items())
        assert bool(full_tokenizer.quantize.initialized)


@pytest.mark.parametrize("fault", ["missing", "unexpected", "shape"])
def test_taming_checkpoint_mismatch_names_the_keys(tmp_path, taming_key_shapes, full_tokenizer, fault):
    state = _random_state(taming_key_shapes)
    if fault == "missing":
        key = "encoder.mid.attn_1.q.weight"
        del state[key]
    elif fault == "unexpected":
        key = "encoder.down.4.attn.2.q.weight"
        state[key] = torch.randn(512, 512, 1, 1)
    else:
        key = "quantize.embedding.weight"
        state[key] = torch.randn(16384, 256)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(ConfigError) as err:
        load_taming_checkpoint(full_tokenizer, tmp_path / "bad.ckpt")
    label = {"missing": "missing keys", "unexpected": "unexpected keys", "shape": "shape mismatches"}[fault]
    assert label in str(err.value) and key in str(err.value)


def test_tiny_tokenizer_refuses_a_taming_checkpoint(tmp_path, taming_key_shapes):
    torch.save(_random_state(taming_key_shapes), tmp_path / "vqgan.pt")
    with pytest.raises(ConfigError, match=r"shape mismatches: .*encoder\.conv_in\.weight.*holohisto_full"):
        load_taming_checkpoint(holohisto_tiny(), tmp_path / "vqgan.pt")


def test_unreadable_or_absent_checkpoint_is_a_config_error(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    for path in (tmp_path / "junk.ckpt", tmp_path / "absent.ckpt"):
        with pytest.raises(ConfigError, match=str(path.name)):
            load_taming_checkpoint(holohisto_tiny(), path)


def test_tiny_net_returns_logits_of_exactly_the_input_size_at_4k_and_uhd():
    model = holohisto_tiny().eval()
    with torch.no_grad():
        for height, width in ((4096, 4096), (2160, 3840)):
            logits = model(torch.rand(1, 3, height, width))
            assert logits.shape == (1, 2, height, width)
            assert torch.isfinite(logits[:, :, ::97, ::89]).all()


def test_odd_sizes_are_padded_with_white_and_cropped_back():
    model = holohisto_tiny(num_classes=3).eval()
    image = torch.rand(1, 3, 300, 517)
    padded = torch.ones(1, 3, 512, 768)
    padded[..., :300, :517] = image
    with torch.no_grad():
        logits = model(image)
        reference = model(padded)[..., :300, :517]
    assert logits.shape == (1, 3, 300, 517)
    torch.testing.assert_close(logits, reference)


@pytest.mark.parametrize("context_branch", ["none", "orientation"])
def test_tiled_eval_head_equals_untiled_head(context_branch):
    model = holohisto_tiny(head_tile_px=256, context_branch=context_branch).eval()  # 3 x 4 tiles
    images = torch.rand(1, 3, 768, 1024)
    with torch.no_grad():
        tiled = model(images)
        model.head.tile_px = 0
        untiled = model(images)
    torch.testing.assert_close(tiled, untiled, atol=1e-5, rtol=1e-5)


def test_tokenizer_encodes_each_window_on_its_own():
    tokenizer = holohisto_tiny().tokenizer.eval()
    image = torch.rand(1, 3, 512, 512) * 2 - 1
    with torch.no_grad():
        whole = tokenizer(image, skip_strides=(2,))
        corner = tokenizer(image[..., 256:, :256], skip_strides=(2,))
    assert whole.tokens.shape == (1, 32, 32, 32) and whole.indices.shape == (1, 32, 32)
    torch.testing.assert_close(whole.tokens[..., 16:, :16], corner.tokens)
    torch.testing.assert_close(whole.skips[0][..., 128:, :128], corner.skips[0])


def test_checkpointed_windows_give_the_same_loss_and_gradients_with_less_kept_memory():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 512, 512)
    target = (torch.rand(2, 1, 512, 512) > 0.7).long()
    grads, kept = {}, {}
    weights = holohisto_tiny(tokenizer={"kmeans_init": False}).state_dict()
    for flag in (False, True):
        model = holohisto_tiny(tokenizer={"window_batch": 2, "kmeans_init": False})
        model.tokenizer.set_grad_checkpointing(flag)
        model.load_state_dict(weights)
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(image)
        loss = F.cross_entropy(logits, target[:, 0]) + model.aux_loss()
        loss.backward()
        grads[flag] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        kept[flag] = sum(saved)
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The encoder's activations are no longer held for backward (measured 0.57 on the tiny net, where
    # the tokenizer is a smaller share than in the full one).
    assert kept[True] < 0.7 * kept[False]


@pytest.mark.parametrize(
    "make",
    [
        lambda: holohisto_tiny(),
        lambda: holohisto_tiny(attention="softmax"),
        lambda: holohisto_tiny(token_path="linear"),
        lambda: holohisto_tiny(token_path="none", skip_strides=(2, 4)),
        lambda: holohisto_tiny(freeze_tokenizer=True, num_classes=4),
        lambda: holohisto_tiny(context_branch="orientation"),
        lambda: UNetBaseline(channels=(8, 16, 32), strides=(2, 2)),
        lambda: SwinUNETRBaseline(feature_size=12, depths=(1, 1, 1, 1)),
    ],
    ids=["tokenizer", "softmax", "linear", "none", "frozen", "orientation", "unet", "swin_unetr"],
)
def test_build_network_from_network_config_rebuilds_the_same_net(make):
    model = make().eval()
    config = json.loads(json.dumps(network_config(model)))  # what a checkpoint stores
    rebuilt = build_network(config).eval()
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    assert network_config(rebuilt) == config
    images = torch.rand(1, 3, 300, 260)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images))


def test_full_size_config_round_trips_and_keeps_the_taming_layout():
    with torch.device("meta"):
        model = holohisto_full()
        rebuilt = build_network(json.loads(json.dumps(network_config(model))))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes["tokenizer.quantize.embedding.weight"] == (1024, 256)


def test_build_network_loads_the_tokenizer_checkpoint_and_resolves_presets(tmp_path):
    source = holohisto_tiny()
    taming_format = {
        k: v for k, v in source.tokenizer.state_dict().items() if not k.startswith("quantize.initialized")
    }
    torch.save({"state_dict": taming_format}, tmp_path / "tokenizer.ckpt")
    config = {**network_config(holohisto_tiny()), "tokenizer_checkpoint": str(tmp_path / "tokenizer.ckpt")}
    model = build_network(config)
    assert torch.equal(model.tokenizer.quantize.embedding.weight, source.tokenizer.quantize.embedding.weight)
    assert torch.equal(model.tokenizer.encoder.conv_in.weight, source.tokenizer.encoder.conv_in.weight)
    preset = build_network({"name": "holohisto", "preset": "tiny", "token_path": "linear", "num_classes": 3})
    assert network_config(preset) == network_config(holohisto_tiny(token_path="linear", num_classes=3))
    with pytest.raises(ConfigError, match="unknown preset"):
        build_network({"name": "holohisto", "preset": "huge"})
    with pytest.raises(ConfigError, match="unknown network"):
        build_network({"name": "resnet"})
    with pytest.raises(ConfigError, match="depth"):
        build_network({"name": "holohisto", "depth": 3})


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_traced_tiny_net_matches_eager_after_save_and_load(tmp_path):
    """torch.jit.trace is the supported export (torch.jit.script does not compile the ModuleList indexing
    and Optional submodules these blocks use); the traced net is valid at the size it was traced at."""
    model = holohisto_tiny().eval()
    images = torch.rand(1, 3, 512, 384)
    with torch.no_grad():
        traced = torch.jit.trace(model, images, check_trace=False)
        torch.jit.save(traced, tmp_path / "model.ts")
        exported = torch.jit.load(tmp_path / "model.ts")
        torch.testing.assert_close(exported(images), model(images))


def test_baselines_take_any_size():
    with torch.no_grad():
        for model in (UNetBaseline(channels=(8, 16, 32), strides=(2, 2)), SwinUNETRBaseline(feature_size=12)):
            assert model.eval()(torch.rand(1, 3, 300, 517)).shape == (1, 2, 300, 517)


def test_quantizer_picks_the_nearest_code_and_passes_gradients_straight_through():
    quantizer = VectorQuantizer(num_codes=4, code_dim=2, beta=0.25)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    z = (
        torch.tensor([[0.9, 0.2], [0.1, 0.8], [-0.6, -0.4], [0.1, -0.1]])
        .T.reshape(1, 2, 2, 2)
        .requires_grad_()
    )
    out = quantizer(z)
    assert out.indices.flatten().tolist() == [1, 2, 3, 0]
    torch.testing.assert_close(out.quantized, quantizer.embed(out.indices))
    out.quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    # Codebook and commitment terms have the same value (different gradients): (1 + beta) * mse.
    expected = 1.25 * F.mse_loss(z.detach(), quantizer.embedding.weight[out.indices].permute(0, 3, 1, 2))
    torch.testing.assert_close(out.loss, expected)


def test_perplexity_of_known_assignments():
    assert perplexity(torch.tensor([5.0, 5.0, 0.0, 0.0])).item() == pytest.approx(2.0)
    assert perplexity(torch.tensor([1.0, 1.0, 1.0, 1.0])).item() == pytest.approx(4.0)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert perplexity(torch.tensor([3.0, 1.0])).item() == pytest.approx(math.exp(entropy))
    quantizer = VectorQuantizer(num_codes=4, code_dim=2)
    quantizer.record_usage(torch.tensor([0, 0, 1, 1]), torch.zeros(1, 2, 2, 2))
    assert quantizer.usage() == pytest.approx({"perplexity": 2.0, "used_codes": 2, "dead_codes": 2})


def test_dead_code_restart_gives_unused_codes_data_vectors():
    quantizer = VectorQuantizer(num_codes=8, code_dim=3, restart_every=2).train()
    live = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.randn(8, 3) + 10.0)
        quantizer.embedding.weight[:2] = live
    # Eight encoder outputs next to each of the two live codes; codes 2-7 are never the nearest.
    data_rows = (live.repeat_interleave(8, dim=0) + 0.01 * torch.randn(16, 3)).reshape(16, 3)
    vectors = data_rows.T.reshape(1, 3, 4, 4)
    for _ in range(2):  # the second training forward triggers the restart
        out = quantizer(vectors)
        quantizer.record_usage(out.indices, vectors)
    restarted = quantizer.embedding.weight[2:]
    assert all((data_rows == code).all(dim=1).any() for code in restarted)
    assert torch.equal(quantizer.embedding.weight[:2], live)
    assert not quantizer.code_counts.any()
    assert quantizer.restart_dead_codes(data_rows) == 8  # nothing counted since: all are dead now


def test_kmeans_init_puts_codes_on_data_clusters_at_the_first_training_forward():
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    points = (centres[:, None] + 0.01 * torch.randn(3, 50, 2)).reshape(-1, 2)
    quantizer = VectorQuantizer(num_codes=3, code_dim=2, kmeans_init=True).train()
    quantizer(points.T.reshape(1, 2, 10, 15))
    assert bool(quantizer.initialized)
    codes = quantizer.embedding.weight.detach()
    nearest_code = torch.cdist(centres, codes).min(dim=1).values
    assert (nearest_code < 0.05).all()
