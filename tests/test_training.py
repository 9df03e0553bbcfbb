"""Training through the bundle's train.json: real steps on synthetic slides, resume, NaN guard, DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from custom.bundle import workflow
from custom.checkpoints import read_checkpoint
from custom.networks import build_network
from custom.training import NonFiniteLossError

BUNDLE = Path(__file__).resolve().parents[1] / "holohisto_bundle"
# A few seconds per epoch on 2 cores: small patches at level 1, a handful of steps.
SMALL = {
    "patch_size": [256, 256],
    "samples_per_epoch": 8,
    "batch_size": 2,
    "val_patches": 2,
    "max_epochs": 1,
    "log_every": 1,
}


def _train(kpis_folder, out, **overrides):
    flow = workflow(
        ["train", "tiny"], "train", dataset_dir=str(kpis_folder), output_dir=str(out), **SMALL | overrides
    )
    flow.run()
    return flow


def test_training_learns_and_saves_checkpoints_that_rebuild_their_network(kpis_folder, tmp_path):
    flow = _train(kpis_folder, tmp_path, samples_per_epoch=64, batch_size=4, val_patches=8, max_epochs=3)
    trainer = flow.parser.get_parsed_content("train#trainer")
    evaluator = flow.parser.get_parsed_content("validate#evaluator")
    assert trainer.state.iteration == 3 * 16
    # 48 steps of the tiny net already separate glomeruli from tubules on these slides
    assert evaluator.state.best_metric > 0.5
    best = read_checkpoint(tmp_path / "model.pt")
    assert best["input_config"] == {
        "patch_size": [256, 256], "patch_level": None, "patch_mpp": 0.5, "class_names": {"1": "Glomerulus"},
        "background_classes": [],
    }  # fmt: skip
    net = build_network(best["network_config"])
    net.load_state_dict(best["network"])  # strict: the record rebuilds exactly this network
    final = read_checkpoint(tmp_path / "final.pt")
    assert {"network", "optimizer", "lr_scheduler", "trainer", "network_config"} <= set(final)
    assert (tmp_path / "tensorboard").is_dir()


def test_resuming_continues_the_step_count_and_schedule(kpis_folder, tmp_path):
    _train(kpis_folder, tmp_path / "a", max_epochs=2)
    first = read_checkpoint(tmp_path / "a" / "final.pt")
    assert first["trainer"]["iteration"] == 8
    flow = _train(kpis_folder, tmp_path / "b", max_epochs=3, resume_from=str(tmp_path / "a" / "final.pt"))
    trainer = flow.parser.get_parsed_content("train#trainer")
    # training went on from step 8 (epoch 2) to step 12, not from 0
    assert trainer.state.iteration == 12 and trainer.state.epoch == 3
    resumed = flow.parser.get_parsed_content("lr_scheduler")
    assert resumed.last_epoch == 12  # the warmup + cosine schedule stepped on, not restarted


def test_non_finite_loss_stops_training_with_a_clear_message_and_finite_weights(kpis_folder, tmp_path):
    flow = workflow(
        ["train", "tiny"],
        "train",
        dataset_dir=str(kpis_folder),
        output_dir=str(tmp_path),
        **SMALL | {"max_epochs": 3},
    )
    network = flow.parser.get_parsed_content("network")
    forward = network.forward
    calls = {"n": 0}

    def poisoned(x):
        calls["n"] += 1
        out = forward(x)
        return out * float("nan") if calls["n"] == 3 and network.training else out

    network.forward = poisoned
    with pytest.raises(Exception) as info:
        flow.run()
    chain, err = [], info.value
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    guard = next(e for e in chain if isinstance(e, NonFiniteLossError))
    assert "became nan at step 3" in str(guard) and "Lower the learning rate" in str(guard)
    assert flow.parser.get_parsed_content("train#trainer").state.iteration == 3
    # the NaN never reached backward(): the weights are still the last finite step's
    assert all(torch.isfinite(p).all() for p in network.parameters())
    for ckpt in tmp_path.glob("*.pt"):  # any checkpoint on disk is a good one
        weights = read_checkpoint(ckpt)["network"].values()
        assert all(torch.isfinite(v).all() for v in weights if v.is_floating_point())


def test_multi_gpu_config_trains_with_two_cpu_processes_on_gloo(kpis_folder, tmp_path):
    configs = "['configs/train.json', 'configs/tiny.json', 'configs/multi_gpu_train.json']"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", configs,
        "--dataset_dir", str(kpis_folder), "--output_dir", str(tmp_path),
    ]  # fmt: skip
    for key, value in SMALL.items():
        args += [f"--{key}", str(value)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    final = read_checkpoint(tmp_path / "final.pt")
    # 8 samples per epoch split over 2 ranks at batch 2: 2 steps per rank
    assert final["trainer"]["iteration"] == 2
    assert not any(k.startswith("module.") for k in final["network"])  # saved unwrapped from DDP
