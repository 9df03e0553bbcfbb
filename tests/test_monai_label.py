"""The bundle loaded the way MONAI Label's bundle tasks load it, call for call.

monailabel is not installed here: 0.8.5 (the release that installs beside monai 1.6.1) pins
numpy<2 and jsonschema<4 through pydicom-seg and numpymaxflow, against this project's numpy 2.4.6
and jsonschema 4.26.0. So these tests make the calls of monailabel/tasks/infer/bundle.py
(BundleInferTask), tasks/infer/basic_infer.py (BasicInferTask._get_network, run_inferer) and
tasks/train/bundle.py (BundleTrainTask) themselves, in their order, on the exported bundle.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigItem, ConfigParser
from monai.bundle import run as bundle_run
from monai.data import partition_dataset
from monai.handlers import CheckpointLoader
from monai.inferers import Inferer
from monai.transforms import Compose
from PIL import Image

from custom.checkpoints import read_checkpoint, save_checkpoint
from custom.export import BUNDLE_NAME, export_bundle
from custom.networks import holohisto_tiny, network_config
from custom.wsi.reader import open_slide

PATCH = [512, 512]
LEVEL = 1


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The export of a tiny checkpoint, unzipped: the folder a MONAI Label app is pointed at."""
    work = tmp_path_factory.mktemp("monailabel")
    torch.manual_seed(123)  # not the training seed: weights that were loaded cannot pass for a fresh init
    net = holohisto_tiny()
    record = {"patch_size": PATCH, "patch_level": LEVEL, "patch_mpp": None}
    checkpoint = save_checkpoint(work / "trained.pt", net, network_config(net), input_config=record)
    with zipfile.ZipFile(export_bundle(work, model=checkpoint)) as archive:
        archive.extractall(work / "apps")
    return work / "apps" / BUNDLE_NAME


@pytest.fixture(scope="module")
def tile(kpis_folder, tmp_path_factory) -> Path:
    """A 512 px tissue tile at the level the tiny net trained on, as the PNG a MONAI Label client sends."""
    slide = open_slide(sorted(kpis_folder.rglob("*_wsi.tiff"))[0])
    pixels = slide.read_region((1024, 1024), PATCH, level=LEVEL)
    path = tmp_path_factory.mktemp("tile") / "tile.png"
    Image.fromarray(pixels).save(path)
    return path


def _load_bundle_config(bundle: Path, name: str) -> ConfigParser:
    """BundleInferTask/BundleTrainTask._load_bundle_config."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / name))
    parser.config.update({"bundle_root": str(bundle)})
    return parser


def _update_device(parser: ConfigParser, device: str) -> None:
    """BundleInferTask._update_device, run before each of pre_transforms, inferer and post_transforms."""
    parser.config.update({"device": device})
    if parser.ref_resolver.items.get("device"):
        parser.ref_resolver.items["device"] = ConfigItem(config=device, id="device")


def _transforms(parser: ConfigParser, key: str) -> list:
    content = parser.get_parsed_content(key, instantiate=True)
    return list(content.transforms) if isinstance(content, Compose) else content


def test_infer_task_reads_its_ids_and_segments_one_tile_as_the_network_does(bundle, tile, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(bundle), *sys.path])  # BundleInferTask: sys.path.insert(0, path)
    parser = _load_bundle_config(bundle, "inference.json")
    model_path = bundle / "models" / "model.pt"
    assert model_path.exists()  # else it would look for models/model.ts
    network = parser.get_parsed_content("network_def", instantiate=True)

    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    key_image, image_format = next(iter(metadata["network_data_format"]["inputs"].items()))
    key_pred, pred_format = next(iter(metadata["network_data_format"]["outputs"].items()))
    labels = {v.lower(): int(k) for k, v in pred_format["channel_def"].items() if v.lower() != "background"}
    assert (key_image, key_pred, labels, len(image_format["spatial_shape"])) == (
        "image",
        "pred",
        {"glomerulus": 1},
        2,
    )

    # BasicInferTask.__call__ -> pre_transforms(data) -> run_transforms
    data = {"image": str(tile), "image_path": str(tile), "device": "cpu"}
    _update_device(parser, "cpu")
    for transform in _transforms(parser, "preprocessing"):
        data = transform(data)
    pixels = torch.from_numpy(np.asarray(Image.open(tile))).permute(2, 1, 0)  # PILReader: (C, W, H)
    torch.testing.assert_close(data[key_image].as_tensor(), pixels.float() / 255)

    # inferer(data): the bundle's tensor-level inferer, not BasicInferTask's default
    _update_device(parser, "cpu")
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    assert isinstance(inferer, Inferer)

    # BasicInferTask._get_network: torch.load (weights-only by default), the "model" key, a strict load
    checkpoint = torch.load(model_path, map_location=torch.device("cpu"))
    state = checkpoint.get("model", checkpoint)
    assert set(state) == set(network.state_dict())  # MONAI Label warns when these differ
    network.load_state_dict(state, strict=True)
    network.eval()

    # run_inferer, then post_transforms(data)
    with torch.no_grad():
        data[key_pred] = inferer(data[key_image][None], network)[0]
    _update_device(parser, "cpu")
    for transform in _transforms(parser, "postprocessing"):
        data = transform(data)

    with torch.no_grad():
        direct = network(data[key_image][None].as_tensor()).argmax(dim=1)
    assert data[key_pred].shape == (1, *PATCH)
    assert set(torch.unique(data[key_pred]).tolist()) <= {0.0, 1.0}
    assert torch.equal(data[key_pred].as_tensor().long(), direct)


def test_train_task_overrides_its_ids_and_starts_from_the_bundled_weights(
    bundle, kpis_folder, tmp_path, monkeypatch
):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the task and monai.bundle.run insert the bundle root
    parser = _load_bundle_config(bundle, "train.json")
    for key in (
        "network",
        "network_def",
        "train#trainer#max_epochs",
        "train#dataset#data",
        "validate#dataset#data",
    ):
        assert key in parser, key
    assert parser["train#trainer#max_epochs"] == "@max_epochs"

    # _fetch_datalist (image and label only) and _partition_datalist (val_split 0.2, no shuffle)
    slides = sorted(kpis_folder.rglob("*_wsi.tiff"))
    datalist = [{"image": str(s), "label": str(s.with_name(s.name.replace("_wsi", "_mask")))} for s in slides]
    train_ds, val_ds = partition_dataset(datalist, ratios=[0.8, 0.2], shuffle=False)
    assert (len(train_ds), len(val_ds)) == (2, 1)

    # _load_checkpoint: pretrained models/model.pt through a CheckpointLoader keyed "model", strict=False
    model_path = bundle / "models" / "model.pt"
    handlers = parser.get("train#handlers", [])
    loader = {
        "_target_": CheckpointLoader.__name__,
        "load_path": str(model_path),
        "load_dict": {"model": "$@network"},
    }
    handlers.insert(0, {**loader, "strict": False})

    out = tmp_path / "run"
    overrides = {
        "bundle_root": str(bundle),
        "train#trainer#max_epochs": 1,
        "train#dataset#data": train_ds,
        "device": torch.device("cpu"),
        "train#handlers": handlers,
        "validate#dataset#data": val_ds,
        # CPU-sized, as a MONAI Label app's `_update_overrides` would set them; learning rate 0 keeps the
        # loaded weights unchanged, so what training saves shows what the loader put in
        "network_config": {"name": "holohisto", "preset": "tiny", "num_classes": 2},
        "patch_size": PATCH,
        "patch_level": LEVEL,
        "patch_mpp": None,
        "samples_per_epoch": 2,
        "batch_size": 2,
        "val_patches": 1,
        "num_workers": 0,
        "learning_rate": 0.0,
        "output_dir": str(out),
    }
    # run_single_gpu
    bundle_run(
        run_id="run",
        init_id=None,
        final_id=None,
        meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "train.json"),
        **overrides,
    )

    shipped = read_checkpoint(model_path)["network"]
    trained = read_checkpoint(out / "final.pt")["network"]
    # the codebook (k-means initialised on the first batch) and normalisation statistics move without a
    # learning rate; every weight must still be the bundled one
    weights = [
        k
        for k in shipped
        if "quantize" not in k and not k.endswith(("running_mean", "running_var", "tracked"))
    ]
    assert len(weights) > 100
    assert all(torch.equal(trained[k], shipped[k]) for k in weights)
    assert read_checkpoint(out / "model.pt")["network_config"] == network_config(holohisto_tiny())
