"""The bundle runs through MONAI's own runner and finds `custom` from wherever it is started."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from custom.checkpoints import save_checkpoint
from custom.networks import holohisto_tiny, network_config
from custom.wsi.reader import open_mask

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "holohisto_bundle"


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    net = holohisto_tiny()
    record = {"patch_size": [512, 512], "patch_level": 1, "patch_mpp": None}
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "model.pt", net, network_config(net), input_config=record
    )


@pytest.mark.parametrize("start", ["bundle root", "repo root", "elsewhere"])
def test_inference_config_runs_with_monai_bundle_run_from_any_folder(
    start, slides_dir, tiny_checkpoint, tmp_path
):
    cwd, root = {
        "bundle root": (BUNDLE, "."),
        "repo root": (REPO, "holohisto_bundle"),
        "elsewhere": (tmp_path, str(BUNDLE)),  # only the config's sys.path insert can find `custom` here
    }[start]
    configs = [str(Path(root) / "configs" / name) for name in ("inference.json", "tiny.json")]
    slide = slides_dir / "derived" / "CMU-1-Small-Region.generic.tif"
    out = tmp_path / "out"
    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs), "--bundle_root", root]
    args += ["--input", str(slide), "--output_dir", str(out), "--ckpt_path", str(tiny_checkpoint)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    mask = open_mask(out / "CMU-1-Small-Region.generic_pred.tiff")
    assert mask.level_shapes[0] == (2967, 2220)
    assert "1 slide(s): 1 ok, 0 failed" in run.stdout
