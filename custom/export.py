"""Export the bundle as one self-contained zip that another lab downloads and runs.

`export_bundle(out_dir, model)` writes `holohisto_bundle_v<version>.zip` with a top-level
`holohisto_bundle/` folder: configs, docs, LICENSE, the `custom` code copied in (the repository's
`holohisto_bundle/custom` is a symlink; the zip holds real files), the OpenSeadragon build the review
page loads (from node_modules/, into custom/view/vendor/), a requirements.txt written from
metadata.json and, when a trained model is given, `models/model.pt` (and train.json's `finetune_from`
pointing at it, so training fine-tunes the model the bundle ships). Nothing else: no tests, no caches,
no training runs, no file over the Model Zoo's 25 MB limit. Unzipped anywhere, or fetched with
`python -m monai.bundle download --name holohisto_bundle --url file://...`, the folder runs with
`python -m monai.bundle run ...` or `python -m custom ...` started inside it.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from custom.bundle import bundle_root
from custom.checkpoints import CONFIG_KEY, NETWORK_KEY, load_weights, read_checkpoint
from custom.errors import ConfigError
from custom.io import atomic_write
from custom.view.assets import vendor_entries

BUNDLE_NAME = "holohisto_bundle"
ZOO_MAX_FILE_MB = 25.0  # the Model Zoo keeps larger files out of git (Git LFS or large_files.yml)
# MONAI Label's BundleInferTask / BundleTrainTask read weights under "model" by default; our own code reads
# "network". The exported checkpoint carries both names for the same tensors (stored once).
MONAI_LABEL_KEY = "model"
INPUT_KEY = "input_config"
# What ships from the bundle root: these folders whole, these files when present. Anything else there
# (models/ from training, eval/, data/) stays behind; the model comes only through `model=`.
FOLDERS = ("configs", "docs", "custom")
TOP_FILES = ("LICENSE", "large_files.yml", "large_files.yaml", "large_files.json")
SKIPPED_DIRS = frozenset({"__pycache__", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints"})
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".tmp")
REQUIRED = ("configs/metadata.json", "configs/inference.json", "configs/train.json", "LICENSE")
FINETUNE_KEY = "finetune_from"
SHIPPED_MODEL = "$@bundle_root + '/models/model.pt'"
ZIP_DATE = (2024, 1, 1, 0, 0, 0)  # fixed timestamps: the same inputs give a byte-identical zip


def export_bundle(
    out_dir: str | Path, model: str | Path | None = None, max_file_mb: float | None = ZOO_MAX_FILE_MB
) -> Path:
    """Write OUT_DIR/holohisto_bundle_v<version>.zip, a bundle another lab unzips and runs as is.

    Args:
        out_dir: folder to write the zip into (created if missing).
        model: a trained checkpoint (model.pt from `python -m custom train` or the demo); it goes in
            as models/model.pt, reduced to the weights and the recorded network and input settings.
            Without it the bundle carries no weights.
        max_file_mb: refuse any file larger than this (the Model Zoo's 25 MB limit); None: no limit.
            The full-size net's weights (~170 MB) exceed it: host them elsewhere and list them in
            large_files.yml for the zoo, or pass --max_file_mb None for a direct hand-over.

    Returns the path of the zip.
    """
    root = bundle_root()
    for name in REQUIRED:
        if not (root / name).is_file():
            raise ConfigError(f"{root / name}: missing; a bundle cannot be exported without it")
    version = json.loads((root / "configs" / "metadata.json").read_text())["version"]
    entries: dict[str, bytes | Path] = {rel: path for rel, path in _bundle_files(root)}
    entries |= dict(vendor_entries())  # `python -m custom view` needs it; npm is not in the bundle
    entries["requirements.txt"] = requirements_txt(root / "configs" / "metadata.json").encode()
    if model is not None:
        entries["models/model.pt"] = _portable_checkpoint(model)
        entries["configs/train.json"] = _fine_tuning_train_config(root / "configs" / "train.json")
    if max_file_mb is not None:
        for rel, item in entries.items():
            size_mb = (len(item) if isinstance(item, bytes) else item.stat().st_size) / 2**20
            if size_mb > max_file_mb:
                raise ConfigError(
                    f"{rel} is {size_mb:.1f} MB, over the {max_file_mb:g} MB limit per file: host it elsewhere "
                    "and list it in large_files.yml (Model Zoo), or export with --max_file_mb None"
                )

    out_dir = Path(out_dir)
    target = out_dir / f"{BUNDLE_NAME}_v{version}.zip"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with (
            atomic_write(target) as tmp,
            zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        ):
            for rel in sorted(entries):
                item = entries[rel]
                info = zipfile.ZipInfo(f"{BUNDLE_NAME}/{rel}", date_time=ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, item if isinstance(item, bytes) else item.read_bytes())
    except OSError as err:
        raise ConfigError(f"{out_dir}: cannot write the bundle there ({err.strerror or err})") from err
    return target


def _bundle_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(path inside the bundle, real file) for everything that ships; symlinks are followed, caches skipped."""
    for name in TOP_FILES:
        if (root / name).is_file():
            yield name, root / name
    for folder in FOLDERS:
        base = (root / folder).resolve()  # custom -> ../custom in the repository
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith("."))
            for name in sorted(filenames):
                if not _skipped(name):
                    path = Path(dirpath) / name
                    yield f"{folder}/{path.relative_to(base).as_posix()}", path


def requirements_txt(metadata_file: str | Path) -> str:
    """`pip install -r` lines for what metadata.json lists: monai, torch, numpy, then the required packages."""
    meta = json.loads(Path(metadata_file).read_text())
    pins = {"monai": meta["monai_version"], "torch": meta["pytorch_version"], "numpy": meta["numpy_version"]}
    pins.update(meta.get("required_packages_version", {}))
    return "".join(f"{name}=={version}\n" for name, version in pins.items())


def _fine_tuning_train_config(train_json: Path) -> bytes:
    """train.json with `finetune_from` set to the shipped models/model.pt.

    Why: MONAI Label's trainer reads train.json by name, with no override, and loads models/model.pt into
    `network`; so the bundle that ships a model must build that model's network and train at its patch
    size and level (which `finetune_from` gives). `--finetune_from ""` still trains from scratch.
    """
    config = json.loads(train_json.read_text())
    if FINETUNE_KEY not in config:
        raise ConfigError(
            f"{train_json}: has no '{FINETUNE_KEY}' id, so the shipped model cannot be fine-tuned"
        )
    config[FINETUNE_KEY] = SHIPPED_MODEL
    return (json.dumps(config, indent=4) + "\n").encode()


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.endswith(SKIPPED_SUFFIXES)


def _portable_checkpoint(path: str | Path) -> bytes:
    """The checkpoint as the bundle ships it: weights (under "network" and "model"), network and input config.

    Optimizer, scheduler and trainer state are dropped, and so is the tokenizer checkpoint path recorded
    at training time (a path on the exporting machine; its weights are inside the state dict anyway).
    The weights are loaded into the network the config describes first, so a mismatch fails here.
    """
    from custom.networks import build_network

    ckpt = read_checkpoint(path)
    config = ckpt.get(CONFIG_KEY)
    if not isinstance(config, dict) or NETWORK_KEY not in ckpt:
        raise ConfigError(
            f"{path}: not a HoloHisto training checkpoint (needs '{NETWORK_KEY}' and '{CONFIG_KEY}'; "
            f"found {sorted(ckpt)[:8]}); export the model.pt that `python -m custom train` writes"
        )
    config = {**config}
    if "tokenizer_checkpoint" in config:
        config["tokenizer_checkpoint"] = None
    network = build_network(config, load_tokenizer_checkpoint=False)
    load_weights(network, path)  # strict; names the keys that differ
    state = network.state_dict()
    portable = {NETWORK_KEY: state, MONAI_LABEL_KEY: state, CONFIG_KEY: config}
    if isinstance(ckpt.get(INPUT_KEY), dict):
        portable[INPUT_KEY] = ckpt[INPUT_KEY]
    buffer = io.BytesIO()
    torch.save(portable, buffer)
    return buffer.getvalue()
