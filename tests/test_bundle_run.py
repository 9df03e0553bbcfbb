"""The bundle runs through MONAI's own runner and finds `custom` from wherever it is started."""

from __future__ import annotations

import json
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
    assert run.returncode == 0, "\n".join(line for line in run.stderr.splitlines() if "Error" in line)
    mask = open_mask(out / "CMU-1-Small-Region.generic_pred.tiff")
    assert mask.level_shapes[0] == (2967, 2220)
    assert "1 slide(s): 1 ok, 0 failed" in run.stdout


def test_multi_gpu_inference_shares_slides_across_two_cpu_processes(slides_dir, tiny_checkpoint, tmp_path):
    datalist = tmp_path / "slides.json"
    derived = slides_dir / "derived"  # two pyramids (cuCIM and tifffile backends): tiny reads level 1
    slides = [derived / "CMU-1-Small-Region.generic.tif", derived / "CMU-1-Small-Region.pyramid.ome.tif"]
    datalist.write_text(json.dumps([{"image": str(s)} for s in slides]))
    configs = "['configs/inference.json', 'configs/tiny.json', 'configs/multi_gpu_inference.json']"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "--config_file", configs,
        "--input", str(datalist), "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(tiny_checkpoint),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run(args, cwd=BUNDLE, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, "\n".join(line for line in run.stderr.splitlines() if "Error" in line)
    # each rank took one slide: two one-slide summaries, and both masks exist
    assert run.stdout.count("1 slide(s): 1 ok, 0 failed") == 2
    written = sorted(p.name for p in (tmp_path / "out").glob("*_pred.tiff"))
    assert written == ["CMU-1-Small-Region.generic_pred.tiff", "CMU-1-Small-Region.pyramid_pred.tiff"]
