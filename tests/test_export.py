"""The exported zip is the whole bundle: another lab downloads it, trains and segments with nothing else.

The end-to-end test fetches the zip with `python -m monai.bundle download --url file://...` into a
temporary folder and runs MONAI's runner from there with PYTHONPATH unset, so the only `custom` it
can import is the copy inside the bundle (a probe in the same folder proves which one it gets).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import zipfile
from importlib.metadata import version as installed_version
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.version import Version

from custom.bundle import bundle_root
from custom.checkpoints import read_checkpoint, save_checkpoint
from custom.errors import ConfigError
from custom.export import BUNDLE_NAME, export_bundle
from custom.networks import build_network, holohisto_tiny, network_config
from custom.synth import write_synthetic_slides
from custom.wsi.reader import open_mask, open_slide

REPO = Path(__file__).resolve().parents[1]
# what training records today: the scale in um/px, the level left to each slide
INPUT_RECORD = {
    "patch_size": [512, 512],
    "patch_level": None,
    "patch_mpp": 0.5,
    "class_names": {"1": "Glomerulus"},
}
MB = 2**20


def _subprocess_env() -> dict[str, str]:
    """The caller's environment without PYTHONPATH; one OpenMP thread (2 shared cores: threads only stall)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    run = subprocess.run(
        args, cwd=cwd, env=_subprocess_env(), capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, f"{args[:4]} failed:\n{run.stderr[-3000:]}"
    return run


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    """A model.pt shaped like training's: weights, records, optimizer state and a stale tokenizer path."""
    torch.manual_seed(0)
    net = holohisto_tiny()
    config = {**network_config(net), "tokenizer_checkpoint": "/somewhere/only/on/our/machine/tokenizer.ckpt"}
    optimizer = torch.optim.AdamW(net.parameters()).state_dict()
    return save_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "model.pt",
        net,
        config,
        input_config=INPUT_RECORD,
        optimizer=optimizer,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_checkpoint) -> Path:
    return export_bundle(tmp_path_factory.mktemp("export"), model=trained_checkpoint)


def test_zip_is_named_by_version_and_holds_only_what_the_bundle_ships(exported):
    metadata = json.loads((bundle_root() / "configs" / "metadata.json").read_text())
    assert exported.name == f"holohisto_bundle_v{metadata['version']}.zip"
    names = zipfile.ZipFile(exported).namelist()
    assert all(name.startswith(f"{BUNDLE_NAME}/") for name in names)
    inside = {name.removeprefix(f"{BUNDLE_NAME}/") for name in names}
    repo_configs = {f"configs/{p.name}" for p in (bundle_root() / "configs").iterdir() if p.is_file()}
    repo_code = {
        f"custom/{p.relative_to(REPO / 'custom').as_posix()}"
        for p in (REPO / "custom").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert repo_configs <= inside and repo_code <= inside
    assert {"LICENSE", "requirements.txt", "models/model.pt", "docs/data_license.txt"} <= inside
    assert not [n for n in inside if "__pycache__" in n or n.endswith(".pyc") or n.startswith("tests/")]
    # every top-level entry is one of the bundle's parts: nothing from the repository root came along
    assert {n.split("/")[0] for n in inside} == {
        "configs",
        "custom",
        "docs",
        "models",
        "LICENSE",
        "requirements.txt",
    }


def test_custom_code_is_copied_in_byte_for_byte_not_linked(exported):
    archive = zipfile.ZipFile(exported)
    for info in archive.infolist():
        rel = info.filename.removeprefix(f"{BUNDLE_NAME}/")
        assert not info.is_dir()
        assert (info.external_attr >> 16) & 0o170000 in (0, 0o100000)  # regular files, never symlinks
        if rel.startswith("custom/view/vendor/openseadragon/"):  # from npm's node_modules, not from custom/
            continue
        if rel.startswith("custom/"):
            assert archive.read(info) == (REPO / rel).read_bytes(), rel


def test_bundle_carries_the_openseadragon_build_the_review_page_loads(exported):
    archive = zipfile.ZipFile(exported)
    vendor = f"{BUNDLE_NAME}/custom/view/vendor/openseadragon"
    build = REPO / "node_modules" / "openseadragon" / "build" / "openseadragon"
    assert archive.read(f"{vendor}/openseadragon.min.js") == (build / "openseadragon.min.js").read_bytes()
    images = {n.rsplit("/", 1)[1] for n in archive.namelist() if n.startswith(f"{vendor}/images/")}
    assert images == {p.name for p in (build / "images").glob("*.png")} and "home_rest.png" in images
    assert archive.read(f"{vendor}/LICENSE.txt") == (build.parents[1] / "LICENSE.txt").read_bytes()
    assert {
        f"{BUNDLE_NAME}/custom/view/static/{n}" for n in ("index.html", "viewer.js", "viewer.css")
    } <= set(archive.namelist())


def test_exported_model_keeps_weights_and_records_and_drops_training_state(
    exported, trained_checkpoint, tmp_path
):
    zipfile.ZipFile(exported).extract(f"{BUNDLE_NAME}/models/model.pt", tmp_path)
    shipped = torch.load(tmp_path / BUNDLE_NAME / "models" / "model.pt", weights_only=True)
    original = read_checkpoint(trained_checkpoint)
    assert sorted(shipped) == ["input_config", "model", "network", "network_config"]
    assert shipped["input_config"] == INPUT_RECORD
    assert shipped["network_config"]["tokenizer_checkpoint"] is None
    assert {**shipped["network_config"], "tokenizer_checkpoint": None} == {
        **original["network_config"],
        "tokenizer_checkpoint": None,
    }
    assert shipped["network"].keys() == original["network"].keys()
    for key, value in original["network"].items():
        assert torch.equal(shipped["network"][key], value), key
        assert (
            shipped["model"][key] is shipped["network"][key]
        )  # MONAI Label's key: the same tensors, stored once
    size = (tmp_path / BUNDLE_NAME / "models" / "model.pt").stat().st_size
    weights = sum(v.numel() * v.element_size() for v in original["network"].values())
    assert size < 1.1 * weights  # one copy of the weights, no optimizer state


def test_a_bundle_that_ships_a_model_fine_tunes_it_and_one_without_trains_from_scratch(exported, tmp_path):
    repo = json.loads((bundle_root() / "configs" / "train.json").read_text())
    shipped_text = zipfile.ZipFile(exported).read(f"{BUNDLE_NAME}/configs/train.json").decode()
    shipped = json.loads(shipped_text)
    # MONAI Label trains with train.json alone and loads models/model.pt into it: the one id it needs
    assert {k for k in repo if repo[k] != shipped[k]} == {"finetune_from"}
    assert repo["finetune_from"] == ""
    assert shipped["finetune_from"] == "$@bundle_root + '/models/model.pt'"
    assert shipped_text == json.dumps(shipped, indent=4) + "\n"  # the zoo's 4-space JSON
    bare = zipfile.ZipFile(export_bundle(tmp_path))
    assert (
        bare.read(f"{BUNDLE_NAME}/configs/train.json")
        == (bundle_root() / "configs" / "train.json").read_bytes()
    )


def test_export_is_byte_reproducible(exported, trained_checkpoint, tmp_path):
    again = export_bundle(tmp_path, model=trained_checkpoint)
    assert again.read_bytes() == exported.read_bytes()


def test_command_line_export_writes_the_same_zip(exported, trained_checkpoint, tmp_path):
    run = _run(
        [sys.executable, "-m", "custom", "export", str(tmp_path), "--model", str(trained_checkpoint)], REPO
    )
    assert run.stdout.strip().splitlines()[-1] == str(tmp_path / exported.name)
    assert (tmp_path / exported.name).read_bytes() == exported.read_bytes()


def test_requirements_txt_pins_what_metadata_lists_at_the_repository_versions(
    exported, metadata_pins, requirements_pins
):
    shipped = zipfile.ZipFile(exported).read(f"{BUNDLE_NAME}/requirements.txt").decode().split()
    pins = dict(line.split("==") for line in shipped)
    assert pins == metadata_pins
    assert {name: requirements_pins.get(name) for name in pins} == pins
    # this environment satisfies them, so the tests below run the bundle the way its users will
    assert {name: Version(installed_version(name)).public for name in pins} == pins


def test_export_refuses_a_checkpoint_that_does_not_fit_its_recorded_network(tmp_path):
    wrong = save_checkpoint(
        tmp_path / "wrong.pt", holohisto_tiny(num_classes=3), network_config(holohisto_tiny())
    )
    with pytest.raises(ConfigError, match="does not match the network: 2 wrong shape"):
        export_bundle(tmp_path / "out", model=wrong)
    bare = tmp_path / "bare.pt"
    torch.save(holohisto_tiny().state_dict(), bare)
    with pytest.raises(ConfigError, match="not a HoloHisto training checkpoint"):
        export_bundle(tmp_path / "out", model=bare)
    assert not (tmp_path / "out").exists()


def test_export_refuses_files_over_the_size_limit_and_names_them(trained_checkpoint, tmp_path):
    with pytest.raises(
        ConfigError, match=r"models/model.pt is 2\.\d MB, over the 1 MB limit.*large_files.yml"
    ):
        export_bundle(tmp_path, model=trained_checkpoint, max_file_mb=1)
    assert export_bundle(tmp_path, model=trained_checkpoint, max_file_mb=None).stat().st_size > 1 * MB


def test_export_to_an_unwritable_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as err:
        export_bundle(blocker / "out")
    assert str(err.value) == f"{blocker / 'out'}: cannot write the bundle there (Not a directory)"


def test_downloaded_bundle_trains_and_segments_with_the_repository_out_of_reach(
    exported, kpis_folder, tmp_path
):
    monai_bundle = [sys.executable, "-m", "monai.bundle"]
    # 1. fetch it the way the Model Zoo's users do, from a folder unrelated to the repository
    fetched = tmp_path / "fetched"
    download = [
        "--name",
        BUNDLE_NAME,
        "--url",
        exported.as_uri(),
        "--bundle_dir",
        str(fetched),
        "--progress",
        "False",
    ]
    _run([*monai_bundle, "download", *download], cwd=tmp_path)
    bundle = fetched / BUNDLE_NAME
    assert (bundle / "custom").is_dir() and not (bundle / "custom").is_symlink()

    # 2. the `custom` a command started in the bundle folder imports is the bundle's own copy
    probe = "import custom, json, sys; print(json.dumps([custom.__file__, sys.path]))"
    custom_file, path = json.loads(_run([sys.executable, "-c", probe], bundle).stdout.splitlines()[-1])
    assert Path(custom_file).resolve() == (bundle / "custom" / "__init__.py").resolve()
    assert REPO not in {Path(entry).resolve() for entry in path if entry}

    # 3. train the tiny configuration on three small KPIs-layout slides, from the bundle folder
    run_dir = tmp_path / "run"
    train = [
        "training", "--config_file", str(["configs/train.json", "configs/tiny.json"]),
        "--dataset_dir", str(kpis_folder), "--output_dir", str(run_dir),
        "--max_epochs", "1", "--samples_per_epoch", "2", "--batch_size", "2", "--val_patches", "1",
    ]  # fmt: skip
    _run([*monai_bundle, "run", *train], cwd=bundle, timeout=600)
    trained = read_checkpoint(run_dir / "model.pt")
    assert trained["network_config"] == network_config(build_network({"name": "holohisto", "preset": "tiny"}))
    assert trained["input_config"] == INPUT_RECORD | {
        "background_classes": []
    }  # the bundle's train.json fine-tunes the shipped model

    # 4. segment a slide training never saw (another seed), small to keep the test short
    (held_out,) = write_synthetic_slides(
        tmp_path / "held_out", width=2048, height=1536, seed=90, progress=False
    )
    slide = held_out.wsi_path
    out = tmp_path / "predictions"
    infer = [
        "--config_file", str(["configs/inference.json", "configs/tiny.json"]),
        "--ckpt_path", str(run_dir / "model.pt"), "--input", str(slide), "--output_dir", str(out),
    ]  # fmt: skip
    run = _run([*monai_bundle, "run", *infer], cwd=bundle)
    assert "1 slide(s): 1 ok, 0 failed" in run.stdout
    stem = slide.name.removesuffix(".tiff")
    mask = open_mask(out / f"{stem}_pred.tiff")
    assert mask.level_shapes[0] == open_slide(slide).level_shapes[0] == (1536, 2048)
    assert set(np.unique(mask.read_level(mask.level_count - 1)).tolist()) <= {0, 1}
    assert json.loads((out / f"{stem}.geojson").read_text())["type"] == "FeatureCollection"
    assert (out / f"{stem}_overlay.png").stat().st_size > 0

    # 5. the bundle's own copy serves the review page, OpenSeadragon included, with no npm in reach
    view = [sys.executable, "-m", "custom", "view", str(out), "--slides", str(slide.parent), "--port", "0"]
    server = subprocess.Popen(view, cwd=bundle, env=_subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert "; open http://127.0.0.1:" in line, line
        url = line.split("; open ", 1)[1].split()[0]
        for path in ("", "osd/openseadragon.min.js", "osd/images/home_rest.png", "api/slides"):
            with urllib.request.urlopen(url + path, timeout=60) as response:
                assert response.status == 200 and response.read(), path
        with urllib.request.urlopen(url + "api/slides", timeout=60) as response:
            (listed,) = json.loads(response.read())["slides"]
        assert listed["name"] == stem and listed["error"] is None and listed["dzi"]["slide"]
    finally:
        server.terminate()
        server.wait(timeout=30)
