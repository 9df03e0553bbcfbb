"""Training the tokenizer as a VQGAN: codebook health, a falling reconstruction loss, checkpoints the net loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from custom.bundle import config_parser, workflow
from custom.errors import ConfigError
from custom.networks import build_network, holohisto_tiny
from custom.networks.decoder import VQAutoencoder, load_taming_autoencoder, vq_autoencoder
from custom.networks.presets import tiny_tokenizer
from custom.networks.tokenizer import VQTokenizer
from custom.tokenizer_training import perceptual_loss, save_tokenizer

BUNDLE = Path(__file__).resolve().parents[1] / "holohisto_bundle"
CONFIGS = ["train_tokenizer", "train_tokenizer_tiny"]
# Short run: 4 patches of 256 px (one tokenizer window each) per step. Restarts every 3 steps, the
# discriminator from step 8 on, and a learning rate high enough that 12 steps visibly fit.
STEPS = 12
BATCH = 4
RESTART_EVERY = 3
ADVERSARIAL_START = 8
LEARNING_RATE = 2e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def short_run(kpis_folder, tmp_path_factory):
    """train_tokenizer.json (+ tiny) for STEPS iterations on synthetic slides, from a collapsed codebook.

    Every code is set to the same vector before the run, so every token starts on code 0: the worst
    codebook there is. Returns what the run recorded, per iteration.
    """
    out = tmp_path_factory.mktemp("tokenizer_run")
    flow = workflow(
        CONFIGS,
        "train",
        dataset_dir=str(kpis_folder),
        output_dir=str(out),
        max_epochs=1,
        samples_per_epoch=STEPS * BATCH,
        batch_size=BATCH,
        val_patches=2,
        log_every=RESTART_EVERY,
        learning_rate=LEARNING_RATE,
        adversarial_start=ADVERSARIAL_START,
        tokenizer_overrides={"kmeans_init": False, "restart_every": RESTART_EVERY},
    )
    autoencoder = flow.parser.get_parsed_content("autoencoder")
    discriminator = flow.parser.get_parsed_content("discriminator")
    trainer = flow.parser.get_parsed_content("train#trainer")
    with torch.no_grad():
        autoencoder.tokenizer.quantize.embedding.weight.copy_(torch.linspace(-1, 1, 32).expand(256, 32))
    recorded: dict[str, list] = {"l1": [], "generator_loss": [], "discriminator_changed": []}
    previous = {"weights": [p.detach().clone() for p in discriminator.parameters()]}

    def record(engine):
        recorded["l1"].append(engine.state.output["l1"])
        recorded["generator_loss"].append(float(engine.state.output["generator_loss"].detach()))
        now = [p.detach().clone() for p in discriminator.parameters()]
        changed = any(not torch.equal(a, b) for a, b in zip(previous["weights"], now, strict=True))
        recorded["discriminator_changed"].append(changed)
        previous["weights"] = now

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    flow.run()
    health = next(h for h in flow.parser.get_parsed_content("train#handlers") if hasattr(h, "history"))
    return {"out": out, "health": health.history, "autoencoder": autoencoder, **recorded}


def test_dead_code_restarts_bring_a_collapsed_codebook_back_into_use(short_run):
    history = short_run["health"]
    # windows of RESTART_EVERY steps: the first is before any restart
    assert [h["step"] for h in history] == list(range(RESTART_EVERY, STEPS + 1, RESTART_EVERY))
    first, last = history[0], history[-1]
    # Only code 0 gets a gradient at first, so it alone moves away from its 255 twins: at most 3 codes
    # (0, the first twin, and one more after the first step's update) before the first restart.
    assert first["used_codes"] <= 3 and first["perplexity"] < 2.0
    assert last["used_codes"] >= 8 * first["used_codes"]
    assert last["perplexity"] >= 4 * first["perplexity"]


def test_reconstruction_loss_falls_over_a_short_run(short_run):
    l1 = short_run["l1"]
    assert len(l1) == STEPS
    start, end = sum(l1[:3]) / 3, sum(l1[-3:]) / 3
    assert end < 0.6 * start, l1


def test_adversarial_terms_switch_on_only_after_the_configured_step(short_run):
    before, after = slice(0, ADVERSARIAL_START), slice(ADVERSARIAL_START, STEPS)
    assert all(g == 0.0 for g in short_run["generator_loss"][before])
    assert not any(short_run["discriminator_changed"][before])
    assert all(g > 0.0 for g in short_run["generator_loss"][after])
    assert all(short_run["discriminator_changed"][after])


def test_saved_tokenizer_loads_into_the_segmentation_net_with_its_exact_weights(short_run):
    path = short_run["out"] / "tokenizer.pt"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    # the tokenizer alone: no decoder, discriminator or optimizer state in the file
    assert sorted(saved) == ["state_dict", "tokenizer_config"]
    assert not any(k.startswith(("decoder.", "post_quant_conv.")) for k in saved["state_dict"])
    net = build_network(
        {"name": "holohisto", "preset": "tiny", "tokenizer_checkpoint": str(path), "freeze_tokenizer": True}
    )
    trained = short_run["autoencoder"].tokenizer.state_dict()
    loaded = net.tokenizer.state_dict()
    assert set(saved["state_dict"]) < set(loaded)
    for key in saved["state_dict"]:
        assert torch.equal(loaded[key], trained[key]), key
    assert bool(net.tokenizer.quantize.initialized)


def test_vqgan_checkpoint_restores_the_autoencoder_and_also_feeds_the_segmentation_net(short_run):
    path = short_run["out"] / "vqgan.pt"
    restored = vq_autoencoder("tiny")
    load_taming_autoencoder(restored, path)
    images = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        expected = short_run["autoencoder"].eval()(images)
        torch.testing.assert_close(restored.eval()(images), expected)
    net = holohisto_tiny()
    net.load_tokenizer(path)  # the decoder's keys are not the tokenizer's business: ignored
    assert torch.equal(
        net.tokenizer.quantize.embedding.weight, short_run["autoencoder"].tokenizer.quantize.embedding.weight
    )


def test_mismatched_tokenizer_checkpoint_fails_naming_the_keys(tmp_path):
    fewer_codes = VQTokenizer(tiny_tokenizer().updated({"num_codes": 128}))
    save_tokenizer(tmp_path / "codes128.pt", fewer_codes)
    with pytest.raises(
        ConfigError, match=r"quantize\.embedding\.weight \(checkpoint \[128, 32\], tokenizer \[256, 32\]\)"
    ):
        holohisto_tiny().load_tokenizer(tmp_path / "codes128.pt")
    save_tokenizer(tmp_path / "ok.pt", VQTokenizer(tiny_tokenizer()))
    state = torch.load(tmp_path / "ok.pt", weights_only=True)
    del state["state_dict"]["quant_conv.bias"]
    torch.save(state, tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match=r"missing keys: quant_conv\.bias"):
        build_network(
            {"name": "holohisto", "preset": "tiny", "tokenizer_checkpoint": str(tmp_path / "missing.pt")}
        )


def test_full_size_autoencoder_keeps_taming_vqmodel_layout():
    with torch.device("meta"):
        model = vq_autoencoder("full")
    shapes = {k: list(v.shape) for k, v in model.taming_state_dict().items()}
    # taming's vqgan_imagenet_f16_1024 decoder: 512 channels at 16 x 16 with attention, 128 at full size
    assert shapes["post_quant_conv.weight"] == [256, 256, 1, 1]
    assert shapes["decoder.conv_in.weight"] == [512, 256, 3, 3]
    assert shapes["decoder.mid.attn_1.q.weight"] == [512, 512, 1, 1]
    assert shapes["decoder.up.4.attn.2.proj_out.weight"] == [512, 512, 1, 1]
    assert shapes["decoder.up.3.block.0.nin_shortcut.weight"] == [256, 512, 1, 1]
    assert shapes["decoder.up.1.upsample.conv.weight"] == [128, 128, 3, 3]
    assert shapes["decoder.conv_out.weight"] == [3, 128, 3, 3]
    assert "decoder.up.0.upsample.conv.weight" not in shapes
    assert all(f"decoder.up.{i}.block.2.conv1.weight" in shapes for i in range(5))


def test_autoencoder_reconstructs_at_input_size_and_refuses_sizes_off_the_window():
    model = VQAutoencoder(tiny_tokenizer()).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 256, 512))
    assert out.shape == (2, 3, 256, 512) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    with pytest.raises(ValueError, match="multiple of the tokenizer window 256 px"):
        model(torch.rand(1, 3, 300, 256))


def test_perceptual_loss_is_off_without_a_weights_file_and_never_downloads(tmp_path):
    assert perceptual_loss("") is None and perceptual_loss(None) is None
    with pytest.raises(ConfigError, match="perceptual-loss weights not found"):
        perceptual_loss(str(tmp_path / "absent.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not weights")
    # without torchvision this names the missing package; with it, the unreadable file: never a download
    with pytest.raises(ConfigError, match=r"torchvision|cannot be loaded"):
        perceptual_loss(str(junk))


def test_bundle_config_trains_through_monai_bundle_run(kpis_folder, tmp_path):
    out = tmp_path / "out"
    configs = str([f"configs/{name}.json" for name in CONFIGS])
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs]
    args += ["--dataset_dir", str(kpis_folder), "--output_dir", str(out), "--max_epochs", "1"]
    args += ["--samples_per_epoch", "4", "--batch_size", "2", "--val_patches", "2", "--log_every", "1"]
    args += ["--adversarial_start", "1"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, "\n".join(line for line in run.stderr.splitlines() if "Error" in line)
    holohisto_tiny().load_tokenizer(out / "tokenizer.pt")

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags.update(accumulator.Tags()["scalars"])
    expected = {"train_codebook/perplexity", "train_codebook/dead_codes", "val_codebook/perplexity"}
    assert expected | {"l1", "codebook", "discriminator_loss", "val_psnr"} <= tags


SHARED_WITH_TRAINING = (
    "device",
    "amp",
    "output_dir",
    "data",
    "tissue",
    "train#dataloader",
    "validate#dataloader",
)


def test_tokenizer_config_shares_train_json_blocks_wherever_it_is_parsed(monkeypatch, tmp_path):
    raw = ConfigParser()
    raw.read_config(str(BUNDLE / "configs" / f"{CONFIGS[0]}.json"))
    assert all(raw[key] == f"%configs/train.json#{key}" for key in SHARED_WITH_TRAINING)
    training = config_parser("train")
    ours = config_parser(CONFIGS[0])
    # `monai.bundle run` parses in the bundle folder with MONAI's own parser
    monkeypatch.chdir(BUNDLE)
    plain = ConfigParser()
    plain.read_config(f"configs/{CONFIGS[0]}.json")
    plain.resolve_macro_and_relative_ids()

    def text(config, key):  # MONAI writes an id's "#" as "::" where it resolves the file's own ids
        return json.dumps(config[key]).replace("::", "#")

    for key in SHARED_WITH_TRAINING:
        assert text(ours, key) == text(plain, key) == text(training, key), key
        assert "%" not in text(ours, key)
    # and the macros survive a working directory with no configs/ in it (the command line's case)
    monkeypatch.chdir(tmp_path)
    assert config_parser(*CONFIGS)["train#dataloader"]["dataset"] == "@train#dataset"
